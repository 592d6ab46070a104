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
