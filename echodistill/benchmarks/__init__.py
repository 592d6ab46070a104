"""Research harness: speed and quality benchmarks. The product never imports this package.

    measuring.py       timing, memory, FLOPs and device facts every benchmark shares
    random_pairs.py    random-weight SD and tiny pairs the speed benchmarks time
    speed.py           `bench sample` (our sampler vs diffusers) and `bench train` (train_step per preset)
    methods.py         the rows of `bench quality` and each one's training config
    quality.py         `bench quality`: EchoDistill, its ablations and student-only baselines on the mini world
    quality_report.py  its tables: summaries, rows paired against EchoDistill, merging side-by-side runs
    lr_sweep.py        `bench lr-sweep`: each method family's learning rate, chosen on a tuning run
    baselines.py       the student-only baselines (Custom Diffusion, Textual Inversion, DreamBooth-LoRA)

The command line that runs them is `echodistill.cli.bench`.
"""
