"""Sampling: the one-step student and the multi-step teacher.

    samplers.py       sample_student (one step at t = 999, or Euler "trailing"), sample_teacher (DDIM + CFG)
    speed.py          SamplerOptions: prompt cache, channels-last, fused q/k/v, torch.compile, CUDA graphs
    with_concept.py   `sample`: either sampler with a trained concept applied for one call

Imports models and the small utilities only.
"""
