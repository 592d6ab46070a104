"""Offline loading of a teacher/student pair that shares ONE tokenizer and ONE text encoder.

    pair = load_model_pair("sd21-base.safetensors", "sd_turbo.safetensors", dtype="bf16", device="cuda")
    pair.teacher.unet, pair.student.unet, pair.text_encoder, pair.tokenizer, pair.vae

Each model is a diffusers folder or a single-file checkpoint (LDM or SGM layout). Modules are
built on the meta device from the family's config and then filled from the file, so nothing
is initialised twice and nothing is fetched from a hub. Only the teacher's text tower is
read; the student's is never loaded (a few of its tensors are hashed to warn when the two
differ). The VAE is the student's, since the student's one-step latents are what gets decoded.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import checkpoint_layout as layout_map
from .errors import IncompatiblePairError, ModelLoadError
from .families import Detection, FamilyConfig, Role, detect_family, family_config
from .tensor_files import TensorFile, fingerprint, read_folder_weights
from .tokenizer import load_clip_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

UNET_FINGERPRINT_KEYS = (
    "conv_in.weight",
    "conv_in.bias",
    "time_embedding.linear_1.weight",
    "conv_out.weight",
    "conv_out.bias",
)
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
TOKEN_ROWS_HASHED = 1024  # enough of the vocabulary to tell two encoders apart without reading 200 MB


class SharedEncoderWarning(UserWarning):
    """Teacher and student text encoders have the same architecture but different weights."""


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class ModelSource:
    """One model on disk, with the config family it is read with."""

    path: Path
    config: FamilyConfig
    reason: str  # why this family: shown to the user
    weights: TensorFile | None = None  # single files only
    layout: str = "diffusers"
    text_kind: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, family: str | os.PathLike = "auto", role: Role = "teacher") -> "ModelSource":
        path = Path(path)
        if path.is_dir():
            if not (path / "unet" / "config.json").is_file():
                raise ModelLoadError(f"{path} is not a diffusers model folder (no unet/config.json)")
            if family == "auto":
                return cls(path, FamilyConfig(path.name, path), "diffusers folder with its own configs")
            return cls(path, family_config(family), "family given by the caller")
        if not path.is_file():
            raise ModelLoadError(f"model not found: {path} (give a .safetensors file or a diffusers folder)")
        weights = TensorFile(path)
        detection: Detection = detect_family(weights, role)
        if family == "auto":
            config, reason = family_config(detection.family), f"detected: {detection.reason}"
        else:
            config, reason = family_config(family), "family given by the caller"
        return cls(path, config, reason, weights, detection.layout, detection.text_kind)

    @property
    def family(self) -> str:
        return self.config.name

    # --- reading components ---------------------------------------------------------------

    def _sources(self, component: str, keys) -> dict[str, layout_map.Source]:
        if component == "unet":
            return layout_map.unet_sources(keys, self.config.unet)
        if component == "vae":
            return layout_map.vae_sources(keys, self.config.vae)
        if self.text_kind is None:
            raise ModelLoadError(f"{self.path.name} has no text encoder to load")
        return layout_map.text_sources(keys, self.layout, self.text_kind)

    def state_dict(self, component: str, model_keys: list[str]) -> dict[str, torch.Tensor]:
        """The diffusers/transformers-named weights of one component, for a model with `model_keys`."""
        if self.weights is None:
            stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
            folder = self.path / component
            if not folder.is_dir():
                raise ModelLoadError(f"{self.path} has no {component}/ folder")
            return _match_text_prefix(read_folder_weights(folder, stem), model_keys)
        return layout_map.gather(self._sources(component, model_keys), self.weights)

    def fingerprint(self, component: str, names: tuple[str, ...]) -> str:
        """Hash of a few tensors of one component, read without loading the component."""
        if self.weights is not None:
            sources = self._sources(component, names)
            return fingerprint(lambda n: sources[n].read(_read_rows_if_token(self.weights, n, sources[n].key)), names)
        stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
        file = _first_existing(self.path / component, (f"{stem}.safetensors", f"{stem}.fp16.safetensors"))
        if file is None:  # sharded or pickled: read whole, once, for a hash
            state = self.state_dict(component, list(names))
            return fingerprint(lambda n: _rows_if_token(n, state[n]), names)
        weights = TensorFile(file)
        prefix = "text_model." if f"text_model.{names[-1]}" in weights else ""
        return fingerprint(lambda n: _read_rows_if_token(weights, n, prefix + n), names)

    def has_component(self, component: str) -> bool:
        if self.weights is None:
            return (self.path / component).is_dir()
        if component == "text_encoder":
            return self.text_kind is not None
        prefix = layout_map.VAE_PREFIX if component == "vae" else layout_map.UNET_PREFIX
        return any(k.startswith(prefix) for k in self.weights.keys())


def _first_existing(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _rows_if_token(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:TOKEN_ROWS_HASHED] if name.endswith("token_embedding.weight") else tensor


def _read_rows_if_token(weights: TensorFile, name: str, key: str) -> torch.Tensor:
    if name.endswith("token_embedding.weight"):
        return weights.rows(key, TOKEN_ROWS_HASHED)
    return weights.get(key)


def _match_text_prefix(state: dict[str, torch.Tensor], model_keys: list[str]) -> dict[str, torch.Tensor]:
    """Bridge transformers 4 (`text_model.` prefix) and 5 (flat) CLIPTextModel key names."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    wants_prefix = any(k.startswith("text_model.") for k in model_keys)
    has_prefix = any(k.startswith("text_model.") for k in state)
    if wants_prefix and not has_prefix:
        return {f"text_model.{k}": v for k, v in state.items()}
    if has_prefix and not wants_prefix:
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _build(factory: Callable[[], torch.nn.Module], read: Callable[[list[str]], dict], dtype, device, what: str):
    """Build a module on the meta device, then fill it from disk: no random init, no copy."""
    with torch.device("meta"):
        module = factory()
    keys = list(module.state_dict().keys())
    keys = [k for k in keys if not k.endswith("position_ids")]
    state = read(keys)
    missing = sorted(set(keys) - set(state))
    unexpected = sorted(set(state) - set(keys))
    if missing or unexpected:
        raise ModelLoadError(
            f"{what}: the weights do not fit the config ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}). Pick the right family for this file."
        )
    for name, tensor in module.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{what}: {name} has shape {tuple(state[name].shape)} in the file but "
                f"{tuple(tensor.shape)} in the config. Pick the right family for this file."
            )
    # contiguous(): a pickled file may hold overlapping views of one storage; parameters must not alias.
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()}
    module.load_state_dict(state, strict=False, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (CLIP position ids) are rebuilt, not loaded
            if not name.endswith("position_ids"):
                raise ModelLoadError(f"{what}: buffer {name} was not restored")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(
                "position_ids", torch.arange(buffer.shape[-1], device=device).expand(1, -1), persistent=False
            )
    module.requires_grad_(False)
    return module.eval()


def load_unet(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> UNet2DConditionModel:
    config = source.config.unet
    return _build(
        lambda: UNet2DConditionModel.from_config(config),
        lambda k: source.state_dict("unet", k),
        dtype,
        device,
        f"UNet of {source.path.name}",
    )


def load_vae(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    config = source.config.vae
    return _build(
        lambda: AutoencoderKL.from_config(config),
        lambda k: source.state_dict("vae", k),
        dtype,
        device,
        f"VAE of {source.path.name}",
    )


def load_text_encoder(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CLIPTextModel:
    config = CLIPTextConfig(**{k: v for k, v in source.config.text_encoder.items() if not k.startswith("_")})
    return _build(
        lambda: CLIPTextModel(config),
        lambda k: source.state_dict("text_encoder", k),
        dtype,
        device,
        f"text encoder of {source.path.name}",
    )


def load_tokenizer(source: ModelSource) -> CLIPTokenizer:
    if source.weights is None and (source.path / "tokenizer" / "vocab.json").is_file():
        return load_clip_tokenizer(source.config.tokenizer_style, folder=source.path / "tokenizer")
    return load_clip_tokenizer(source.config.tokenizer_style, folder=source.config.tokenizer_folder)


@dataclass
class DiffusionModel:
    """One UNet with what a trainer or sampler needs to know about it."""

    unet: UNet2DConditionModel
    config: FamilyConfig
    source: Path
    fingerprint: str
    family_reason: str

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
    """Teacher and student UNets with ONE tokenizer, ONE text encoder and one VAE."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    teacher: DiffusionModel
    student: DiffusionModel
    text_fingerprint: str
    vae_fingerprint: str

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
        return {
            "teacher_unet": self.teacher.fingerprint,
            "student_unet": self.student.fingerprint,
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
    """Load a teacher and a student that share the teacher's tokenizer and text encoder.

    Raises IncompatiblePairError when the two text encoders differ in architecture, and warns
    (SharedEncoderWarning) when they share the architecture but not the weights.
    """
    dtype = resolve_dtype(dtype)
    teacher_source = ModelSource.open(teacher, teacher_family, role="teacher")
    student_source = ModelSource.open(student, student_family, role="student")
    check_shareable(teacher_source, student_source)
    if not teacher_source.has_component("text_encoder"):
        raise ModelLoadError(
            f"the teacher {teacher_source.path.name} has no text encoder; the pair shares the teacher's"
        )

    text_encoder = load_text_encoder(teacher_source, dtype, device)
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
            teacher_source.fingerprint("unet", UNET_FINGERPRINT_KEYS),
            teacher_source.reason,
        ),
        student=DiffusionModel(
            student_unet,
            student_source.config,
            student_source.path,
            student_source.fingerprint("unet", UNET_FINGERPRINT_KEYS),
            student_source.reason,
        ),
        text_fingerprint=teacher_source.fingerprint("text_encoder", TEXT_FINGERPRINT_KEYS),
        vae_fingerprint=vae_fingerprint,
    )


def check_shareable(teacher: ModelSource, student: ModelSource) -> None:
    """Raise unless one text encoder can serve both; warn when their weights differ."""
    teacher_arch, student_arch = teacher.config.text_architecture, student.config.text_architecture
    if teacher_arch != student_arch:
        raise IncompatiblePairError(
            f"teacher {teacher.path.name} ({teacher.family}) has a {teacher_arch}, but student "
            f"{student.path.name} ({student.family}) has a {student_arch}. EchoDistill trains one "
            "shared text encoder, so pick a pair of the same family line (e.g. SD 2.1 teacher + SD-Turbo student)."
        )
    context = (teacher.config.unet["cross_attention_dim"], student.config.unet["cross_attention_dim"])
    if len(set(context)) != 1 or context[0] != teacher.config.text_encoder["hidden_size"]:
        raise IncompatiblePairError(
            f"cross-attention widths {context} (teacher, student) do not both match the shared "
            f"text encoder's width {teacher.config.text_encoder['hidden_size']}"
        )
    if not (teacher.has_component("text_encoder") and student.has_component("text_encoder")):
        return
    teacher_print = teacher.fingerprint("text_encoder", TEXT_FINGERPRINT_KEYS)
    student_print = student.fingerprint("text_encoder", TEXT_FINGERPRINT_KEYS)
    if teacher_print != student_print:
        warnings.warn(
            f"teacher and student text encoders share the architecture but not the weights "
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
