"""Whole jobs on a loaded pair, for front ends (ComfyUI nodes, the command line, scripts).

    runs.py    train_concept: train, resume or reuse a concept in a run folder named by run_key
    sample     (from echodistill.sampling.with_concept) images with a concept applied for one call
    demo.py    the main job on the embedded default: one held-out mini-world concept, end to end

Front ends import these; the jobs import training, sampling, concepts, evaluation and miniworld.
"""

from ..sampling.with_concept import sample
from .runs import BUNDLE_NAME, CHECKPOINT_NAME, TrainingResult, run_key, train_concept

__all__ = ["BUNDLE_NAME", "CHECKPOINT_NAME", "TrainingResult", "run_key", "sample", "train_concept"]
