"""Research harness: speed and quality benchmarks. The product never imports this package.

    measuring.py    timing, memory, FLOPs and device facts every benchmark shares
    speed.py        `bench sample` (our sampler vs diffusers) and `bench train` (train_step per preset)
    quality.py      `bench quality`: EchoDistill, its ablations and student-only baselines on the mini world
    lr_sweep.py     `bench lr-sweep`: each method family's learning rate, chosen on a tuning run
    baselines.py    the student-only baselines (Custom Diffusion, Textual Inversion, DreamBooth-LoRA)

The command line that runs them is `echodistill.cli.bench`.
"""
