"""What the benchmarks' command-line help and checks name, free of torch: `bench ... --help` answers at once.

The modules that run the benchmarks (measuring, random_pairs, baselines) import these from here.
"""

from __future__ import annotations

from ..errors import EchoDistillError


class BenchError(EchoDistillError, ValueError):
    """A benchmark cannot run as asked (device, model, sizes)."""


DTYPE_NAMES = ("fp32", "fp16", "bf16")  # as echodistill.models.loading.DTYPES
MODEL_NAMES = ("tiny", "sd", "sdxl")  # the random-weight pairs random_pairs.MODELS builds
MODEL_HELP = ("sd: SD-Turbo / SD 2.1 base architectures with random weights; sdxl: SDXL-Turbo / SDXL base (two text "
              "encoders); tiny: the test models")


def held_out_subjects(names, flag: str = "concepts") -> list[str]:
    """The canonical names of the subjects a benchmark scores, each once: a named held-out concept, or a fresh
    procedural subject as "procedural_<seed>" or its bare seed (miniworld.procedural.fresh_subject_name).

    Raises BenchError naming `flag` for an unknown name, or a seed the world's models or oracle trained on
    (a subject they saw is no test of personalization).
    """
    from ..miniworld.procedural import fresh_subject_name

    try:
        return list(dict.fromkeys(fresh_subject_name(str(name)) for name in names))
    except ValueError as error:
        raise BenchError(f"{flag}: {error}") from None
