"""Offline loading of one model's components: a diffusers folder or a single-file checkpoint.

Each model is a diffusers folder or a single-file checkpoint (LDM or SGM layout; SDXL files are
SGM with two text towers). Modules are
built on the meta device from the family's config and then filled from the file, so nothing
is initialised twice and nothing is fetched from a hub. `pair.py` puts a teacher and a student
together on top of this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ModelLoadError
from . import checkpoint_layout as layout_map
from .families import (
    SDXL_FAMILIES,
    Detection,
    FamilyConfig,
    Role,
    UnsupportedModelError,
    detect_family,
    detect_layout,
    family_config,
    refuse_unsupported_folder,
)
from .tensor_files import TensorFile, fingerprint, folder_weight_files, read_folder_weights
from .tokenizer import load_clip_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TOKEN_ROWS_HASHED = 1024  # enough of the vocabulary to tell two encoders apart without reading 200 MB


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


NAMED_FAMILY = "family given by the caller"  # ModelSource.reason when the caller named the family
OWN_CONFIGS = "diffusers folder with its own configs"  # ... for a diffusers folder read on auto


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
            refuse_unsupported_folder(path)
            if not (path / "unet" / "config.json").is_file():
                raise ModelLoadError(f"{path} is not a diffusers model folder (no unet/config.json)")
            own = FamilyConfig(path.name, path)
            if family == "auto":
                return cls(path, own, OWN_CONFIGS)
            named = family_config(family)
            if own.is_sdxl != named.is_sdxl:  # its weights could never fit the named family's modules
                what = "an SDXL" if own.is_sdxl else "an SD 1.x / 2.x"
                raise ModelLoadError(f"{path.name} is {what} diffusers folder (its own configs say so), but family "
                                     f"{named.name!r} was named: name a family of its kind, or leave it on auto")
            return cls(path, named, NAMED_FAMILY)
        if not path.is_file():
            raise ModelLoadError(f"model not found: {path} (give a .safetensors file or a diffusers folder)")
        weights = TensorFile(path)
        try:
            detection: Detection = detect_family(weights, role)
        except UnsupportedModelError:
            raise
        except ModelLoadError:
            if family == "auto":
                raise
            # A file detection cannot place (e.g. a UNet without its text tower) is read as the family named.
            layout, text_kind = detect_layout(weights)
            detection = Detection(family_config(family).name, layout, text_kind, NAMED_FAMILY)
        if family == "auto":
            config, reason = family_config(detection.family), f"detected: {detection.reason}"
        else:
            config, reason = family_config(family), NAMED_FAMILY
            _check_named_family(path, detection, config)
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
        return layout_map.text_sources(keys, self.layout, self.text_kind, component)

    def state_dict(self, component: str, model_keys: list[str]) -> dict[str, torch.Tensor]:
        """The diffusers/transformers-named weights of one component ("unet", "vae", "text_encoder",
        "text_encoder_2"), for a model with `model_keys`."""
        if self.weights is None:
            stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
            folder = self.path / component
            if not folder.is_dir():
                raise ModelLoadError(f"{self.path} has no {component}/ folder")
            return _match_text_prefix(read_folder_weights(folder, stem), model_keys)
        return layout_map.gather(self._sources(component, model_keys), self.weights)

    def components(self, role: Role) -> tuple[str, ...]:
        """What `role` reads of this model: the teacher its UNet and text encoder(s), the student its UNet and VAE."""
        return ("unet", *(self.config.text_components if role == "teacher" else ("vae",)))

    def check_files(self, role: Role) -> None:
        """Open what `role` reads (teacher: UNet + text encoders; student: UNet + VAE): configs parsed, every weight
        file's header read, nothing loaded. `inspect` refuses a damaged model with it before any training; loading
        (`inspect --load`, `fleet run --check`, every job) also checks every tensor's name, shape and type.

        Raises ModelLoadError naming the missing or unreadable part.
        """
        _ = self.config.unet  # parsed and checked
        _ = self.config.scheduler  # parsed and checked: training and sampling read the schedule
        if role == "teacher":
            _ = self.config.model_index  # parsed: the conditioner reads SDXL's empty-prompt rule from it
        for component in self.components(role):
            if not self.has_component(component):
                raise ModelLoadError(f"{self.path} has no {component} (the {role} reads it): give the whole model")
            if self.weights is None:
                self.config._read(component)  # its config.json parses
                stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
                folder_weight_files(self.path / component, stem)

    def fingerprint(self, component: str, names: tuple[str, ...]) -> str:
        """Hash of a few tensors of one component, read without loading the component."""
        if self.weights is not None:
            sources = self._sources(component, names)
            return fingerprint(lambda n: sources[n].read(_read_rows_if_token(self.weights, n, sources[n].key)), names)
        stem = "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"
        file = _first_existing(self.path / component, (f"{stem}.safetensors", f"{stem}.fp16.safetensors"))
        if file is None:  # sharded or pickled: read whole, once, for a hash
            state = self.state_dict(component, list(names))
            return fingerprint(lambda n: _rows_if_token(n, state[n]), names)
        weights = TensorFile(file)
        prefix = "text_model." if f"text_model.{names[-1]}" in weights else ""
        return fingerprint(lambda n: _read_rows_if_token(weights, n, prefix + n), names)

    def text_config_misfit(self, component: str = "text_encoder") -> str | None:
        """For a diffusers folder: one line saying how `component`'s config.json contradicts its weights (width,
        vocabulary, layer count, read from the weight files' headers: nothing is loaded), else None. A single
        file is read with its family's configs, which detection checked against its weights."""
        if self.weights is not None or not (self.path / component).is_dir() or self.reason == NAMED_FAMILY:
            return None  # a named family's configs are not the folder's: the load says to leave it on auto
        config = self.config.text_config(component)
        problems = text_config_problems(config)
        if problems:
            return (f"{self.path / component / 'config.json'} cannot describe a text encoder: "
                    f"{'; '.join(problems)}. Restore the file from the model's release.")
        shapes, layers = {}, set()
        for weights in folder_weight_files(self.path / component, "model"):
            for key in weights.keys():
                bare = key.removeprefix("text_model.")
                if bare == "embeddings.token_embedding.weight":
                    shapes["vocab_size"], shapes["hidden_size"] = weights.shape(key)
                elif bare == "embeddings.position_embedding.weight":
                    shapes["max_position_embeddings"] = weights.shape(key)[0]
                elif bare == "encoder.layers.0.mlp.fc1.weight":
                    shapes["intermediate_size"] = weights.shape(key)[0]
                elif bare.startswith("encoder.layers."):
                    layers.add(bare.split(".")[2])
        if layers:
            shapes["num_hidden_layers"] = len(layers)
        defaults = CLIPTextConfig()  # what transformers takes for a size the file leaves out
        wrong = [f"{name} {json.dumps(config[name])} (the weights: {value})" if name in config else
                 f"no {name}, so transformers' default {getattr(defaults, name)} (the weights: {value})"
                 for name, value in shapes.items() if config.get(name, getattr(defaults, name)) != value]
        if not wrong:
            return None
        return (f"{self.path / component / 'config.json'} does not describe the weights beside it: it gives "
                f"{', '.join(wrong)}. Restore the file from the model's release.")

    def has_component(self, component: str) -> bool:
        if self.weights is None:
            return (self.path / component).is_dir()
        if component == "text_encoder":
            return self.text_kind is not None
        if component == "text_encoder_2":
            return self.text_kind == "sdxl"
        prefix = layout_map.VAE_PREFIX if component == "vae" else layout_map.UNET_PREFIX
        return any(k.startswith(prefix) for k in self.weights.keys())


def _check_named_family(path: Path, detection: Detection, config: FamilyConfig) -> None:
    """Refuse to read an SDXL file with an SD 1.x / 2.x family, or the reverse: the tensors could never fit."""
    detected_xl = detection.family in SDXL_FAMILIES
    if detected_xl != config.is_sdxl:
        what = "an SDXL" if detected_xl else "an SD 1.x / 2.x"
        fits = "sdxl-base or sdxl-turbo" if detected_xl else "sd21-base, sd21-768v, sd-turbo or sd15"
        raise ModelLoadError(
            f"{path.name} is {what} checkpoint ({detection.reason}), but family {config.name!r} was named: "
            f"name one of {fits}, or leave the family on auto"
        )


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


def _mismatch_advice(source: ModelSource, component: str) -> str:
    """What to do when `component`'s weights do not fit its config: a single file is read with its family's
    configs (another family may fit); a diffusers folder's configs are its own (folder and weights disagree),
    unless a family was named for it."""
    if source.layout == "diffusers" and source.reason == NAMED_FAMILY:
        return (f"The folder was read with family {source.family}'s configs, as named, not its own: leave the family "
                "on auto to read it with the configs it ships.")
    if source.layout == "diffusers":
        return (f"The folder's {component}/config.json does not describe its weights (parts of two models?): "
                "restore the folder from the model's release.")
    return "Pick the right family for this file (`echodistill inspect FILE` says which family it is read as)."


def _build(factory: Callable[[], torch.nn.Module], read: Callable[[list[str]], dict], dtype, device, what: str,
           advice: str):
    """Build a module on the meta device, then fill it from disk: no random init, no copy. Raises
    ModelLoadError naming a missing, extra, misshapen or non-float tensor, ending with `advice`."""
    try:
        with torch.device("meta"):
            module = factory()
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:  # a bad config value (e.g. a
        # negative size: torch's RuntimeError)
        raise ModelLoadError(f"{what}: its config cannot build the model ({type(exc).__name__}: {exc}). "
                             f"{advice}") from None
    keys = list(module.state_dict().keys())
    keys = [k for k in keys if not k.endswith("position_ids")]
    state = read(keys)
    missing = sorted(set(keys) - set(state))
    unexpected = sorted(set(state) - set(keys))
    if missing or unexpected:
        raise ModelLoadError(
            f"{what}: the weights do not fit the config ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}). {advice}"
        )
    for name, tensor in module.state_dict().items():
        if name in state and tensor.is_floating_point() and not state[name].is_floating_point():
            raise ModelLoadError(f"{what}: {name} holds {state[name].dtype} values where a weight is a floating-point "
                                 "number: a damaged or foreign file; restore it from the model's release")
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"{what}: {name} has shape {tuple(state[name].shape)} in the file but "
                f"{tuple(tensor.shape)} in the config. {advice}"
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
        _mismatch_advice(source, "unet"),
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
        _mismatch_advice(source, "vae"),
    )


def load_text_encoder(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    component: str = "text_encoder",
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """One text encoder of `source`: "text_encoder" (a `CLIPTextModel`) or, for SDXL, "text_encoder_2"
    (a `CLIPTextModelWithProjection`: OpenCLIP ViT-bigG and its pooled-output projection, as diffusers'
    StableDiffusionXLPipeline uses it). Raises ModelLoadError when the weights do not fit the config."""
    settings = source.config.text_config(component)
    what = f"{component.replace('_', ' ')} of {source.path.name}"
    problems = text_config_problems(settings)
    if problems:
        raise ModelLoadError(f"{what}: its config cannot build the model ({'; '.join(problems)}). "
                             f"{_mismatch_advice(source, component)}")
    try:
        config = CLIPTextConfig(**{k: v for k, v in settings.items() if not k.startswith("_")})
    except Exception as exc:  # transformers / huggingface_hub validate a config with errors of their own
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise ModelLoadError(f"{what}: its config cannot build the model ({cause}). "
                             f"{_mismatch_advice(source, component)}") from None
    projected = component == "text_encoder_2" or "CLIPTextModelWithProjection" in settings.get("architectures", ())
    model_class = CLIPTextModelWithProjection if projected else CLIPTextModel
    return _build(
        lambda: model_class(config),
        lambda k: source.state_dict(component, k),
        dtype,
        device,
        what,
        _mismatch_advice(source, component),
    )


# CLIP text-encoder sizes that must be whole numbers of at least one (transformers' CLIPTextConfig checks none).
_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings")


def text_config_problems(settings: dict) -> list[str]:
    """What no CLIP text encoder can be built from in a text encoder's config.json (transformers builds some of
    them and fails at the first prompt, e.g. -3 attention heads): sizes that are not whole numbers ≥ 1, a width
    the heads do not divide, an activation transformers does not have (`transformers.activations.ACT2FN`).
    Absent keys take CLIPTextConfig's defaults and are not problems."""
    from transformers.activations import ACT2FN

    problems = []
    for key in (k for k in _TEXT_SIZES if k in settings):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} is {json.dumps(value)}, not a whole number of at least 1")
    width, heads = settings.get("hidden_size"), settings.get("num_attention_heads")
    if not problems and isinstance(width, int) and isinstance(heads, int) and width % heads:
        problems.append(f"hidden_size {width} is not a multiple of num_attention_heads {heads}")
    act = settings.get("hidden_act", "quick_gelu")
    if not isinstance(act, str) or act not in ACT2FN:
        problems.append(f"hidden_act {json.dumps(act)} is no activation transformers has (e.g. \"gelu\", "
                        "\"quick_gelu\")")
    return problems


def load_tokenizer(source: ModelSource, component: str = "text_encoder") -> CLIPTokenizer:
    """The tokenizer of one text encoder component: the model folder's own `tokenizer/` (`tokenizer_2/`)
    vocabulary when it has one, else the shipped CLIP vocabulary; padded as the family's style says."""
    style = source.config.tokenizer_style_of(component)
    folder_name = "tokenizer" if component == "text_encoder" else "tokenizer_2"
    if source.weights is None and (source.path / folder_name / "vocab.json").is_file():
        return load_clip_tokenizer(style, folder=source.path / folder_name)
    return load_clip_tokenizer(style, folder=source.config.tokenizer_folder)
