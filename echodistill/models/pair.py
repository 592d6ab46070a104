"""A teacher/student pair that shares its tokenizer(s) and text encoder(s), loaded offline.

    pair = load_model_pair("sd21-base.safetensors", "sd_turbo.safetensors", dtype="bf16", device="cuda")
    pair.teacher.unet, pair.student.unet, pair.text_encoder, pair.tokenizer, pair.vae
    pair = load_model_pair("sd_xl_base_1.0.safetensors", "sd_xl_turbo_1.0.safetensors")
    pair.text_encoder, pair.text_encoder_2, pair.tokenizer, pair.tokenizer_2   # SDXL: both shared
    cond = pair.conditioner.encode(["a photo of a dog"], size=(512, 512))    # every family

Only the teacher's text towers are read; the student's are never loaded (a few of their tensors are
hashed to warn when they differ). The VAE is the student's, since the student's one-step
latents are what gets decoded. Each model is read by `loading.py`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import IncompatiblePairError, ModelLoadError
from .conditioning import PromptConditioner
from .families import FamilyConfig
from .loading import ModelSource, load_text_encoder, load_tokenizer, load_unet, load_vae, resolve_dtype

# What a UNet fingerprint reads: its ends (which model) and every cross-attention K/V projection (the
# weights the concept adapters modify: a LoRA merged into them makes another base model). About 100 MB
# of an SD 2.x UNet, read lazily tensor by tensor; never the whole file.
UNET_FINGERPRINT_KEYS = (
    "conv_in.weight",
    "conv_in.bias",
    "time_embedding.linear_1.weight",
    "conv_out.weight",
    "conv_out.bias",
)
CROSS_ATTENTION_KV = ("attn2.to_k.weight", "attn2.to_v.weight")
FINGERPRINT_SCHEME = "2"  # 1 (no "scheme" key): UNET_FINGERPRINT_KEYS only


def unet_fingerprint_keys(unet: torch.nn.Module) -> tuple[str, ...]:
    """UNET_FINGERPRINT_KEYS and the UNet's cross-attention K/V weights, in a fixed order."""
    kv = sorted(k for k in unet.state_dict() if k.endswith(CROSS_ATTENTION_KV))
    return (*UNET_FINGERPRINT_KEYS, *kv)
VAE_FINGERPRINT_KEYS = (
    "encoder.conv_in.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "decoder.conv_out.weight",
)
TEXT_FINGERPRINT_KEYS = (
    "embeddings.token_embedding.weight",
    "embeddings.position_embedding.weight",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
)

EOS_TOKEN_ID = 49407  # <|endoftext|> in the CLIP BPE vocabulary every family uses


class SharedEncoderWarning(UserWarning):
    """Teacher and student text encoders have the same architecture but different weights."""


@dataclass
class DiffusionModel:
    """One UNet with what a trainer or sampler needs to know about it."""

    unet: UNet2DConditionModel
    config: FamilyConfig
    source: Path
    fingerprint: str
    family_reason: str
    legacy_fingerprint: str | None = None  # UNET_FINGERPRINT_KEYS only: checks bundles saved before K/V were hashed

    @property
    def family(self) -> str:
        return self.config.name

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def scheduler_config(self) -> dict:
        return dict(self.config.scheduler)


@dataclass
class ModelPair:
    """Teacher and student UNets with ONE set of tokenizers and text encoders, and one VAE.

    SD 1.x / 2.x: `tokenizer` + `text_encoder`. SDXL adds `tokenizer_2` + `text_encoder_2` (OpenCLIP
    ViT-bigG with its projection), named as in diffusers' StableDiffusionXLPipeline. Both serve both
    UNets; `conditioner` turns prompts into what the UNets read.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    teacher: DiffusionModel
    student: DiffusionModel
    text_fingerprint: str
    vae_fingerprint: str
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    text_fingerprint_2: str | None = None

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """Every tokenizer, in the order of `text_encoders`."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        """Every shared text encoder: one (SD 1.x / 2.x) or two (SDXL: 768-wide CLIP ViT-L, 1280-wide bigG)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def is_sdxl(self) -> bool:
        return self.teacher.config.is_sdxl

    @property
    def conditioner(self) -> PromptConditioner:
        """Prompts -> `Conditioning` through the pair's own tokenizers and encoders (built per call: cheap,
        and it follows a tokenizer replaced by `pristine`)."""
        return PromptConditioner(
            self.tokenizers, self.text_encoders, added_conditioning=self.is_sdxl,
            zeros_for_empty_prompt=self.teacher.config.force_zeros_for_empty_prompt,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def vae_downscale(self) -> int:
        """Pixels per latent cell along a side: 8 for SD's VAE (three downsamplings)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def fingerprints(self) -> dict[str, str]:
        """Hashes of the base weights (UNets' ends and K/V, text encoders' tables, VAE); SDXL adds "text_encoder_2"."""
        prints = {
            "teacher_unet": self.teacher.fingerprint,
            "student_unet": self.student.fingerprint,
            "text_encoder": self.text_fingerprint,
            "vae": self.vae_fingerprint,
            "scheme": FINGERPRINT_SCHEME,
        }
        if self.text_fingerprint_2 is not None:
            prints["text_encoder_2"] = self.text_fingerprint_2
        return prints

    def legacy_fingerprints(self) -> dict[str, str | None]:
        """The fingerprints as versions before scheme 2 took them (UNet ends only)."""
        return {
            "teacher_unet": self.teacher.legacy_fingerprint,
            "student_unet": self.student.legacy_fingerprint,
            "text_encoder": self.text_fingerprint,
            "vae": self.vae_fingerprint,
        }


def load_model_pair(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    *,
    teacher_family: str | os.PathLike = "auto",
    student_family: str | os.PathLike = "auto",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelPair:
    """Load a teacher and a student that share the teacher's tokenizer(s) and text encoder(s).

    Families: SD 2.1 (sd21-base, sd21-768v) with SD-Turbo (sd-turbo), SD 1.5 (sd15), and SDXL base
    (sdxl-base) with SDXL-Turbo (sdxl-turbo); "auto" detects them from a single file's keys and
    header or uses a diffusers folder's own configs. For SDXL both text encoders are loaded once,
    from the teacher, and serve both UNets (`pair.text_encoder`, `pair.text_encoder_2`).

    Raises IncompatiblePairError when the text encoders differ in architecture (e.g. an SD 2.x teacher
    with an SDXL student), and warns (SharedEncoderWarning) when they share the architecture but not
    the weights.

    Loaded with inference mode off whatever the caller's mode (ComfyUI runs nodes inside
    `torch.inference_mode()`): inference tensors could never be trained or tracked.
    """
    check_device(device)
    with torch.inference_mode(False):
        return _load_model_pair(teacher, student, teacher_family=teacher_family, student_family=student_family,
                                dtype=dtype, device=device)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists here; ModelLoadError naming it otherwise (before any weight loads)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"device={device!r} is not a device: write cpu, cuda, cuda:1 or mps ({error})",
                             parameters=("device",)) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise ModelLoadError(f"device={device!r} is not available here ({count} CUDA device(s) found); "
                                 "use device=cpu or a CUDA device that exists", parameters=("device",))
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device={device!r} is not available here; use device=cpu", parameters=("device",))
    return resolved


def _load_model_pair(teacher, student, *, teacher_family, student_family, dtype, device) -> ModelPair:
    dtype = resolve_dtype(dtype)
    teacher_source = ModelSource.open(teacher, teacher_family, role="teacher")
    student_source = ModelSource.open(student, student_family, role="student")
    for source in (teacher_source, student_source):  # the schedules every trainer and sampler reads, checked
        _ = source.config.scheduler
    _ = teacher_source.config.model_index  # the conditioner reads it
    check_shareable(teacher_source, student_source)
    if not teacher_source.has_component("text_encoder"):
        raise ModelLoadError(
            f"the teacher {teacher_source.path.name} has no text encoder (a UNet-only file?): the pair reads every "
            "prompt through the teacher's text encoder(s). Give the teacher's whole checkpoint (SD 2.1 or SDXL base, "
            "text encoders included) or its diffusers folder"
        )

    text_encoder = load_text_encoder(teacher_source, dtype, device)
    second = "text_encoder_2" in teacher_source.config.text_components
    text_encoder_2 = load_text_encoder(teacher_source, dtype, device, "text_encoder_2") if second else None
    if text_encoder_2 is not None:
        # Pool at the real end token (id 49407), as ComfyUI does: transformers' legacy rule for eos_token_id 2
        # (the published config) takes the highest id instead, which an added concept token (49408) would be.
        text_encoder_2.text_model.eos_token_id = text_encoder_2.config.eos_token_id = EOS_TOKEN_ID
    teacher_unet = load_unet(teacher_source, dtype, device)
    student_unet = load_unet(student_source, dtype, device)
    vae = load_vae(student_source, dtype, device)
    # Fingerprints are taken from the files, so they do not depend on the dtype loaded.
    vae_fingerprint = student_source.fingerprint("vae", VAE_FINGERPRINT_KEYS)
    _warn_if_teacher_vae_differs(teacher_source, vae_fingerprint)
    return ModelPair(
        tokenizer=load_tokenizer(teacher_source),
        text_encoder=text_encoder,
        vae=vae,
        teacher=DiffusionModel(
            teacher_unet,
            teacher_source.config,
            teacher_source.path,
            teacher_source.fingerprint("unet", unet_fingerprint_keys(teacher_unet)),
            teacher_source.reason,
            teacher_source.fingerprint("unet", UNET_FINGERPRINT_KEYS),
        ),
        student=DiffusionModel(
            student_unet,
            student_source.config,
            student_source.path,
            student_source.fingerprint("unet", unet_fingerprint_keys(student_unet)),
            student_source.reason,
            student_source.fingerprint("unet", UNET_FINGERPRINT_KEYS),
        ),
        text_fingerprint=teacher_source.fingerprint("text_encoder", TEXT_FINGERPRINT_KEYS),
        vae_fingerprint=vae_fingerprint,
        tokenizer_2=load_tokenizer(teacher_source, "text_encoder_2") if second else None,
        text_encoder_2=text_encoder_2,
        text_fingerprint_2=teacher_source.fingerprint("text_encoder_2", TEXT_FINGERPRINT_KEYS) if second else None,
    )


def check_shareable(teacher: ModelSource, student: ModelSource) -> None:
    """Raise unless one set of text encoders can serve both; warn when their weights differ."""
    for source in (teacher, student):  # an edited config is named as such, not blamed on the pair
        for component in source.config.text_components:
            misfit = source.text_config_misfit(component)
            if misfit:
                raise ModelLoadError(misfit)
    teacher_arch, student_arch = teacher.config.text_architecture, student.config.text_architecture
    if teacher.config.is_sdxl != student.config.is_sdxl:
        xl, other = (teacher, student) if teacher.config.is_sdxl else (student, teacher)
        raise IncompatiblePairError(
            f"teacher {teacher.path.name} ({teacher.family}) and student {student.path.name} ({student.family}) "
            f"cannot share a text encoder: {xl.family} reads two (CLIP ViT-L + OpenCLIP ViT-bigG, 2048-wide) and "
            f"{other.family} one ({other.config.text_architecture}); "
            "pair SDXL base with SDXL-Turbo, or SD 2.1 with SD-Turbo"
        )
    if teacher_arch != student_arch:
        raise IncompatiblePairError(
            f"teacher {teacher.path.name} ({teacher.family}) has a {teacher_arch}, but student "
            f"{student.path.name} ({student.family}) has a {student_arch}. EchoDistill trains one "
            "shared text encoder, so pick a pair of the same family line (e.g. SD 2.1 teacher + SD-Turbo student)."
        )
    context = (teacher.config.unet["cross_attention_dim"], student.config.unet["cross_attention_dim"])
    if len(set(context)) != 1 or context[0] != teacher.config.context_width:
        raise IncompatiblePairError(
            f"cross-attention widths {context} (teacher, student) do not both match the shared "
            f"text encoders' width {teacher.config.context_width}"
        )
    for component in teacher.config.text_components:
        if not (teacher.has_component(component) and student.has_component(component)):
            continue
        teacher_print = teacher.fingerprint(component, TEXT_FINGERPRINT_KEYS)
        student_print = student.fingerprint(component, TEXT_FINGERPRINT_KEYS)
        if teacher_print != student_print:
            warnings.warn(
                f"teacher and student {component.replace('_', ' ')}s share the architecture but not the weights "
                f"(teacher {teacher_print}, student {student_print}); the teacher's encoder serves both "
                "and the student's is not loaded.",
                SharedEncoderWarning,
                stacklevel=3,
            )


def _warn_if_teacher_vae_differs(teacher: ModelSource, student_vae_print: str) -> None:
    if not teacher.has_component("vae"):
        return
    teacher_print = teacher.fingerprint("vae", VAE_FINGERPRINT_KEYS)
    if teacher_print != student_vae_print:
        warnings.warn(
            f"teacher and student VAEs differ (teacher {teacher_print}, student {student_vae_print}); "
            "the student's VAE is used for both.",
            SharedEncoderWarning,
            stacklevel=3,
        )
