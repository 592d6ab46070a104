"""Random-weight model pairs for the speed benchmarks: speed does not depend on the values.

`sd` builds the real SD-Turbo / SD 2.1 base architectures, `sdxl` the real SDXL-Turbo / SDXL base
ones (both text encoders: CLIP ViT-L and OpenCLIP ViT-bigG with its projection), from the shipped
configs directly on the target device and dtype: built on the meta device, materialised with
`to_empty`, filled by a fan-in scaled normal. On `device="meta"` they stay unmaterialised: shapes
only, for counting FLOPs and bytes (`meta_run.py`). `tiny` is the test suite's tiny pair.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .measuring import BenchError
from .names import MODEL_HELP  # noqa: F401 - the help beside the builders

if TYPE_CHECKING:  # models imports diffusers: load it only when a benchmark runs
    from ..models.pair import ModelPair


# --- models --------------------------------------------------------------------------------------

def _random_module(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype):
    """A module built on the meta device and materialised on `device` in `dtype`: no CPU init, no copy."""
    with torch.device("meta"):
        module = factory()
    # nn.Module.to, not diffusers' override: it warns about `_keep_in_fp32_modules`, empty for SD's UNet and VAE.
    module = torch.nn.Module.to(module, dtype=dtype)
    if device.type == "meta":  # shapes only: nothing to fill
        return module.requires_grad_(False).eval()
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)  # fan-in scaled: activations stay O(1), no denormals
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)  # norm scales
        for name, buffer in module.named_buffers():
            if not name.endswith("position_ids"):
                raise BenchError(f"{type(module).__name__} has a buffer {name} this builder does not know how to fill")
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return module.requires_grad_(False).eval()


def _sd_pair(device: torch.device, dtype: torch.dtype, with_teacher: bool) -> ModelPair:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.families import family_config
    from ..models.pair import DiffusionModel, ModelPair
    from ..models.tokenizer import load_clip_tokenizer

    teacher_config, student_config = family_config("sd21-base"), family_config("sd-turbo")
    text_config = CLIPTextConfig(**{k: v for k, v in teacher_config.text_encoder.items() if not k.startswith("_")})
    student = _random_module(lambda: UNet2DConditionModel.from_config(student_config.unet), device, dtype)
    teacher = (
        _random_module(lambda: UNet2DConditionModel.from_config(teacher_config.unet), device, dtype)
        if with_teacher else student  # sampling never calls the teacher: share, and save 3.5 GB in fp32
    )
    return ModelPair(
        tokenizer=load_clip_tokenizer(teacher_config.tokenizer_style),
        text_encoder=_random_module(lambda: CLIPTextModel(text_config), device, dtype),
        vae=_random_module(lambda: AutoencoderKL.from_config(student_config.vae), device, dtype),
        teacher=DiffusionModel(teacher, teacher_config, teacher_config.folder, "random", "bench: random weights"),
        student=DiffusionModel(student, student_config, student_config.folder, "random", "bench: random weights"),
        text_fingerprint="random",
        vae_fingerprint="random",
    )


def _sdxl_pair(device: torch.device, dtype: torch.dtype, with_teacher: bool) -> ModelPair:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.families import family_config
    from ..models.pair import EOS_TOKEN_ID, DiffusionModel, ModelPair
    from ..models.tokenizer import load_clip_tokenizer

    teacher_config, student_config = family_config("sdxl-base"), family_config("sdxl-turbo")

    def text_config(component: str) -> CLIPTextConfig:
        config = teacher_config.text_config(component)
        return CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})

    student = _random_module(lambda: UNet2DConditionModel.from_config(student_config.unet), device, dtype)
    teacher = (
        _random_module(lambda: UNet2DConditionModel.from_config(teacher_config.unet), device, dtype)
        if with_teacher else student  # sampling never calls the teacher: share, and save 10 GB in fp32
    )
    text_encoder_2 = _random_module(lambda: CLIPTextModelWithProjection(text_config("text_encoder_2")), device, dtype)
    text_encoder_2.text_model.eos_token_id = text_encoder_2.config.eos_token_id = EOS_TOKEN_ID  # as load_model_pair
    return ModelPair(
        tokenizer=load_clip_tokenizer(teacher_config.tokenizer_style_of("text_encoder")),
        text_encoder=_random_module(lambda: CLIPTextModel(text_config("text_encoder")), device, dtype),
        vae=_random_module(lambda: AutoencoderKL.from_config(student_config.vae), device, dtype),
        teacher=DiffusionModel(teacher, teacher_config, teacher_config.folder, "random", "bench: random weights"),
        student=DiffusionModel(student, student_config, student_config.folder, "random", "bench: random weights"),
        text_fingerprint="random",
        vae_fingerprint="random",
        tokenizer_2=load_clip_tokenizer(teacher_config.tokenizer_style_of("text_encoder_2")),
        text_encoder_2=text_encoder_2,
        text_fingerprint_2="random",
    )


def _tiny_pair(device: torch.device, dtype: torch.dtype, with_teacher: bool) -> ModelPair:
    # with_teacher is ignored: the tiny teacher costs nothing worth saving.
    from ..models.families import FamilyConfig
    from ..models.pair import DiffusionModel, ModelPair
    from ..models.tiny import build_tiny_pair
    from ..models.tokenizer import load_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="echodistill-bench-") as root:
        world = build_tiny_pair(Path(root))
        configs = {name: FamilyConfig(name, folder) for name, folder in world["families"].items()}
        for config in configs.values():  # read now: the folder is gone after this block
            config.unet, config.vae, config.text_encoder, config.scheduler

    def place(module: torch.nn.Module) -> torch.nn.Module:
        # Frozen, as load_model_pair leaves them. Cast only when asked: diffusers warns about any dtype cast.
        module = module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)
        return module.requires_grad_(False).eval()

    models = {role: {k: place(m) for k, m in parts.items()} for role, parts in world["models"].items()}
    teacher, student = configs["tiny-sd21"], configs["tiny-turbo"]
    return ModelPair(
        tokenizer=load_clip_tokenizer("sd2"),
        text_encoder=models["teacher"]["text_encoder"],
        vae=models["student"]["vae"],
        teacher=DiffusionModel(models["teacher"]["unet"], teacher, teacher.folder, "random", "bench: tiny random"),
        student=DiffusionModel(models["student"]["unet"], student, student.folder, "random", "bench: tiny random"),
        text_fingerprint="random",
        vae_fingerprint="random",
    )


MODELS: dict[str, Callable[[torch.device, torch.dtype, bool], "ModelPair"]] = {
    "tiny": _tiny_pair, "sd": _sd_pair, "sdxl": _sdxl_pair,
}


def build_pair(
    model: str, device: str | torch.device, dtype: torch.dtype | str, *, with_teacher: bool = True
) -> ModelPair:
    """A random-weight pair: 'sd' (real SD-Turbo + SD 2.1 base architectures), 'sdxl' (real SDXL-Turbo + SDXL base)
    or 'tiny'. On device "meta" the real architectures are not materialised (see `meta_run`).

    Raises BenchError for an unknown model name (listing the valid ones).
    """
    from ..models.loading import resolve_dtype

    if model not in MODELS:
        raise BenchError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    torch.manual_seed(0)
    return MODELS[model](torch.device(device), resolve_dtype(dtype), with_teacher)
