"""EchoDistill: personalize a one-step student together with its multi-step teacher.

    import echodistill as ed

    pair = ed.load_model_pair("sd21-base.safetensors", "sd_turbo.safetensors")
    result = ed.train_concept(pair, "photos/", ed.preset("paper", class_word="dog"), run_dir="runs/dog")
    images = ed.sample(pair, ["a <v*> dog on the beach"], concept=result.bundle, seeds=[0]).images

The library never imports ComfyUI; `nodes/` adapts it to ComfyUI, `echodistill.cli` to a shell.
Its rooms and the one way imports run between them: docs/architecture.md. The entry points below
are imported on first use, so `import echodistill` (and `echodistill --help`) does not load torch.
"""

from __future__ import annotations

import importlib

from .version import __version__

# name -> module that defines it
_ENTRY_POINTS = {
    "load_model_pair": "echodistill.models.pair",
    "ModelPair": "echodistill.models.pair",
    "TrainConfig": "echodistill.training.config",
    "PRESETS": "echodistill.training.config",
    "preset": "echodistill.training.config",
    "Trainer": "echodistill.training.trainer",
    "Callbacks": "echodistill.training.callbacks",
    "TrainingCancelled": "echodistill.training.callbacks",
    "train_concept": "echodistill.jobs.runs",
    "sample": "echodistill.sampling.with_concept",
    "sample_student": "echodistill.sampling.samplers",
    "sample_teacher": "echodistill.sampling.samplers",
    "ConceptBundle": "echodistill.concepts.bundle",
    "export_lora": "echodistill.concepts.export",
    "export_embedding": "echodistill.concepts.export",
    "evaluate": "echodistill.evaluation.metrics",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'echodistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # imported once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
