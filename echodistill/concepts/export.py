"""Export a ConceptBundle for core ComfyUI nodes: a kohya-format UNet LoRA and a token embedding.

The two files replace the bundle in a stock ComfyUI graph: ``LoraLoaderModelOnly`` with the
LoRA on the base checkpoint the concept was trained on, and ``embedding:NAME`` in the prompt.

What ComfyUI accepts (read in comfy/lora.py ``load_lora`` / ``model_lora_keys_unet``,
comfy/weight_adapter/lora.py and comfy/sd1_clip.py ``load_embed``):

- UNet keys ``lora_unet_<module path, dots as underscores>``: ComfyUI maps every diffusers name of
  the UNet (via ``comfy.utils.unet_to_diffusers``) and every LDM name of its own state dict to its
  LDM weight. SD 1.x / 2.x exports write diffusers paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k``), SDXL exports the SGM
  paths of Stability AI's single files (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``),
  each as kohya's sd-scripts writes that family (kohya_keys.py).
- per key, either ``.lora_up.weight`` (out, r), ``.lora_down.weight`` (r, in) and an optional
  scalar ``.alpha``, patched as ``W + strength * alpha / r * up @ down`` (no alpha: scale 1);
  or ``.diff`` (ΔW, the weight's own shape), patched as ``W + strength * diff``, plus an
  optional ``.diff_b`` for the bias. Our adapters never change a bias, so no ``.diff_b`` is written.
  A conv layer's factors are kohya's conv layout: down (r, in, kh, kw), up (out, r, 1, 1).

Other clients (read in their public loaders):

- diffusers (``load_lora_weights``) converts kohya ``lora_up``/``lora_down``/``alpha`` into a peft
  adapter (on an SDXL pipeline from SGM block names too), but refuses ``.diff`` keys on an SD UNet.
  Its peft config holds ONE default alpha and
  only reliably honours per-layer ranks (``rank_pattern``), so per-layer alphas that differ end up
  applied as the most common one: a full-rank export whose layers differ in rank (320 / 640 /
  1024 on SD 2.x K/V) would load at alpha_common / r instead of 1. Every lowrank export therefore
  writes ONE alpha for all layers and folds each layer's own scale into its factors, so
  ``alpha / r · up @ down`` is ΔW in ComfyUI, diffusers, A1111/Forge and InvokeAI alike.
- A1111/Forge and InvokeAI read both ``lora_up``/``lora_down``/``alpha`` and ``.diff`` layers.

So ``lowrank`` (default; full rank is exact) loads everywhere; ``diff`` is ComfyUI, A1111/Forge
and InvokeAI only. Size: ``diff`` stores out·in numbers per layer, full-rank ``lowrank`` stores
r·(out + in) with r = min(out, in), which is MORE than ``diff`` (SD-Turbo K/V: about 165 MiB vs
97.5 MiB); only a rank well below min(out, in) makes ``lowrank`` the smaller file.
- a key ComfyUI cannot map is only logged ("lora key not loaded") and silently does nothing;
  ``apply_kohya_lora`` (reference.py) raises on such a key instead, which is how the tests prove
  every key maps.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, get_args

import torch
from torch import nn

from ..files import check_name, check_writable
from ..models.tensor_files import atomic_save_safetensors
from ..version import __version__
from .bundle import SDXL_ROW_NAMES, ConceptBundle
from .deltas import Part, bundle_deltas, factor_product, lora_factors, low_rank_factors  # noqa: F401
from .kohya_keys import (  # noqa: F401  (KOHYA_SUFFIXES, kohya_key: part of this module's interface)
    KOHYA_SUFFIXES,
    KOHYA_UNET_PREFIX,
    ExportError,
    check_against_unet,
    export_unet_config,
    kohya_key,
    kohya_keys,
)

ExportMode = Literal["diff", "lowrank"]

EXPORT_METADATA_KEY = "echodistill_export"
# Text width -> kohya's ss_base_model_version. Only these two are stated; other widths stay unnamed.
BASE_MODEL_VERSIONS = {1024: "sd_v2", 768: "sd_v1"}
# What kohya's sd-scripts writes for SDXL LoRAs (ss_base_model_version) and Stability AI's model spec
# (modelspec.architecture "<architecture>/<adapter>"), which A1111/Forge and other tools read to file a
# LoRA or an embedding under SDXL.
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"



class OutputExistsError(ExportError, FileExistsError):
    """The export target exists and overwrite=False."""


class RankWarning(UserWarning):
    """A lowrank export asked for a rank above what some layers' ΔW holds: those are written at their full rank."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote, and how far a low-rank export is from the bundle's exact ΔW."""

    path: Path
    part: str
    mode: str
    layers: int
    rank: int | None  # largest rank written (lowrank), None for diff
    errors: dict[str, float]  # module -> ||ΔW - scale * up @ down||_F / ||ΔW||_F (0 where exact)
    max_error: float
    mean_error: float
    metadata: dict[str, str] = field(repr=False)

    def summary(self) -> str:
        rank = "exact ΔW" if self.rank is None else f"rank {self.rank}"
        return (
            f"{self.path}: {self.layers} {self.part} UNet layers, {self.mode} ({rank}), "
            f"relative error max {self.max_error:.3g}, mean {self.mean_error:.3g}"
        )


# --- writing --------------------------------------------------------------------------------


def _target(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"{path.name}: exports are safetensors files; name it *.safetensors")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it", parameters=("overwrite",))
    return path


def _text_width(bundle: ConceptBundle) -> int:
    return int(bundle.embedding.shape[-1])


def _same_or_dynamic(values: set) -> str | None:
    # kohya's resize_lora writes "Dynamic" when layers differ in rank; an empty export states nothing.
    if not values:
        return None
    return str(values.pop()) if len(values) == 1 else "Dynamic"


def _sdxl_spec(adapter: str, title: str) -> dict[str, str]:
    """Stability AI's model spec 1.0.0 header of an SDXL LoRA ("lora") or embedding ("textual-inversion")."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{SDXL_ARCHITECTURE}/{adapter}",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": title,
    }


def _lora_metadata(bundle: ConceptBundle, part: str, mode: str, ranks: set, alphas: set, errors) -> dict[str, str]:
    width = _text_width(bundle)
    info = {
        "kind": "lora",
        "part": part,
        "mode": mode,
        "token": bundle.token,
        "class_word": bundle.class_word,
        "initializer": bundle.initializer,
        "adapter": bundle.adapter,
        "base_unet_fingerprint": bundle.fingerprints.get(f"{part}_unet"),
        "fingerprints": bundle.fingerprints,
        "families": bundle.families,
        "step": bundle.step,
        "bundle_version": bundle.version,
        "pack_version": __version__,
        "max_relative_error": max(errors.values(), default=0.0),
    }
    meta = {
        EXPORT_METADATA_KEY: json.dumps(info, sort_keys=True),
        "ss_steps": str(bundle.step),
        "ss_training_comment": (
            f"EchoDistill {part} UNet for concept {bundle.token!r} (class word {bundle.class_word!r}); "
            "use it with the matching embedding file"
        ),
    }
    if bundle.is_sdxl:
        meta.update(_sdxl_spec("lora", f"EchoDistill {bundle.token} ({part})"))
        meta["ss_base_model_version"] = SDXL_BASE_MODEL_VERSION
        meta["ss_v2"] = "False"
    elif width in BASE_MODEL_VERSIONS:
        meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[width]
        meta["ss_v2"] = str(BASE_MODEL_VERSIONS[width] == "sd_v2")
    for name, values in (("ss_network_dim", ranks), ("ss_network_alpha", alphas)):
        value = _same_or_dynamic(set(values))
        if value is not None:
            meta[name] = value
    return meta


def export_lora(
    bundle: ConceptBundle,
    path: str | os.PathLike,
    *,
    part: Part = "student",
    mode: ExportMode = "lowrank",
    rank: int | None = None,
    unet_config: Mapping | nn.Module | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write the UNet adapter of `part` as a kohya-format LoRA (see the module docstring for clients).

    mode="lowrank" (default): ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, which
    ComfyUI, diffusers, A1111/Forge and InvokeAI all load. A peft LoRA bundle is written as its
    own factors (down = lora_A, up = lora_B: exact) unless `rank` is below its rank; custom-diffusion
    ΔW (and a LoRA asked for a lower rank) is fitted by truncated SVD at `rank` (None: full rank,
    exact). One alpha is written for every layer and each layer's own scale is folded into its
    factors, so alpha / r · up @ down is that layer's ΔW at strength 1 in every client. A `rank` above what a
    layer's ΔW holds (min(out, in), or a LoRA bundle's own rank) writes that layer at its full rank, exact, and
    warns once (RankWarning) naming the rank asked for and the ranks used.
    mode="diff": one exact ``.diff`` (ΔW) per layer; the patched weight is W + strength·ΔW. ComfyUI,
    A1111/Forge and InvokeAI read it; diffusers does not. The report gives each layer's relative
    Frobenius error and their max and mean.

    Key names (see `kohya_keys`): SD 1.x / 2.x concepts get diffusers module paths
    (``lora_unet_down_blocks_…``), SDXL concepts the SGM / LDM paths of Stability AI's single files
    (``lora_unet_input_blocks_…`` / ``middle_block_…`` / ``output_blocks_…``), as kohya's sd-scripts
    writes each, with ``ss_base_model_version`` "sdxl_base_v1-0" and ``modelspec.architecture``
    "stable-diffusion-xl-v1-base/lora" in the header for SDXL.

    `unet_config` (a diffusers UNet config, or a UNet without adapters), when given, checks that every
    layer exists in that UNet with ΔW's shape before anything is written; without it, the config the
    bundle stored at training is checked against (bundles saved before it was stored: SD 1.x / 2.x
    ones are not checked). An SDXL concept needs it to
    name its keys unless it was trained on a shipped SDXL family (sdxl-base / sdxl-turbo), whose config
    is then used and checked against. Raises ExportError (nothing written) when the UNet does not fit,
    when it is of the other kind (SDXL vs SD 1.x / 2.x), or when an SDXL concept of another family comes
    without one; OutputExistsError when `path` exists and not `overwrite`.
    """
    if mode not in get_args(ExportMode):
        raise ExportError(f"mode={mode!r} is not one of {', '.join(map(repr, get_args(ExportMode)))}",
                          parameters=("mode",))
    if rank is not None and rank < 1:
        raise ExportError(f"rank={rank} must be a positive integer (or leave it out: full rank, exact)",
                          parameters=("rank",))
    if rank is not None and mode != "lowrank":
        raise ExportError(f"rank={rank} applies to mode=lowrank only: {mode} patches are exact, at full rank",
                          parameters=("rank", "mode"))
    target = _target(path, overwrite)
    deltas = bundle_deltas(bundle, part)  # module -> (out, in)
    if not deltas:
        raise ExportError(f"the bundle has no {part} adapter weights to export")
    layout = export_unet_config(bundle.is_sdxl, bundle.families, part, unet_config, bundle.unet_configs.get(part))
    if unet_config is not None:
        check_against_unet({m: tuple(d.shape) for m, d in deltas.items()}, unet_config)
    elif layout is not None:
        stored = bool(bundle.unet_configs.get(part))
        check_against_unet({m: tuple(d.shape) for m, d in deltas.items()}, layout,
                           f"the {part} UNet it was trained on" if stored else f"the shipped {bundle.families[part]} UNet",
                           " (its config, stored in the bundle): the bundle was edited or damaged; export one as "
                           "training saved it" if stored else ": pass unet_config= (the config of the UNet it was "
                           "trained on)")
    keys = kohya_keys(deltas, layout, bundle.is_sdxl)  # module -> lora_unet_…

    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: set[int] = set()
    alphas: set[float] = set()
    peft = lora_factors(bundle, part) if bundle.adapter == "lora" else {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    capped: dict[str, int] = {}  # module -> the rank written, where it is below the rank asked for
    for module, delta in sorted(deltas.items()):
        key = keys[module]
        if mode == "diff":
            tensors[f"{key}.diff"] = delta.contiguous()
            errors[module] = 0.0
            continue
        if module in peft and (rank is None or rank >= peft[module][0].shape[0]):
            down, up, alpha = peft[module]
            errors[module] = 0.0
        else:
            down, up, errors[module] = low_rank_factors(delta, rank or min(delta.flatten(1).shape))
            alpha = float(down.shape[0])
        if rank is not None and down.shape[0] < rank:
            capped[module] = int(down.shape[0])
        factors[module] = (down, up, alpha)
    if capped:  # one warning per export, not one per layer
        used = sorted(set(capped.values()))
        warnings.warn(f"rank {rank} was asked for, but {len(capped)} of {len(deltas)} layers hold less: they are "
                      f"written at the full rank of their ΔW ({', '.join(map(str, used))}), which is exact; a rank "
                      f"of {min(used)} or less fits every layer", RankWarning, stacklevel=2)
    # One alpha for all layers (diffusers keeps only one, see the module docstring): each layer's
    # alpha_l / r becomes alpha / r by scaling both factors by sqrt(alpha_l / alpha) (<= 1).
    common = max((alpha for _, _, alpha in factors.values()), default=0.0)
    for module, (down, up, alpha) in factors.items():
        key = keys[module]
        if alpha != common:
            root = (alpha / common) ** 0.5
            down, up = down * root, up * root
        tensors[f"{key}.lora_down.weight"] = down.contiguous()  # (r, in) or (r, in, kh, kw)
        tensors[f"{key}.lora_up.weight"] = up.contiguous()  # (out, r) or (out, r, 1, 1)
        tensors[f"{key}.alpha"] = torch.tensor(common, dtype=torch.float32)
        ranks.add(int(down.shape[0]))
        alphas.add(common)

    metadata = _lora_metadata(bundle, part, mode, ranks, alphas, errors)
    atomic_save_safetensors(tensors, target, metadata)
    values = list(errors.values())
    return ExportReport(
        path=target,
        part=part,
        mode=mode,
        layers=len(deltas),
        rank=max(ranks) if ranks else None,
        errors=errors,
        max_error=max(values),
        mean_error=sum(values) / len(values),
        metadata=metadata,
    )


def export_embedding(bundle: ConceptBundle, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the concept token's embedding row(s) for ComfyUI's ``embedding:NAME`` prompt syntax.

    Put the file in ComfyUI's ``models/embeddings`` as ``NAME.safetensors``; the prompt then says
    ``embedding:NAME`` where it said the token, and keeps the class word, e.g. the training
    prompt "a photo of <v*> dog" becomes "a photo of embedding:NAME dog". The rows are the ones the
    student reads (its own when it was trained without the shared text encoder), float32.

    SD 1.x / 2.x: one tensor (1, D), keyed by the concept's token (e.g. ``<v*>``), so every client
    reads it without being told anything more:

    - ComfyUI's ``load_embed`` (comfy/sd1_clip.py) takes ``string_to_param``, else its tokenizer's key
      (``clip_l`` / ``clip_h``), else the file's first tensor - ours - and checks its width.
    - diffusers' ``load_textual_inversion`` registers a one-tensor file under the tensor's key,
      so the token needs no ``token=`` and the prompt is the one our samplers take
      ("a photo of <v*> dog"). It refuses a token already in the vocabulary; pass ``token=``
      to load two concepts trained with the same token.
    - A1111/Forge take the one tensor of a one-tensor file (trigger word: the file name), and
      InvokeAI reads the token count from the tensor's first dimension (1) and its base model
      from the width (768: SD 1.x, 1024: SD 2.x); trigger ``<file name>``.

    SDXL: two tensors, ``clip_l`` (1, 768) for the CLIP ViT-L encoder and ``clip_g`` (1, 1280) for
    the OpenCLIP ViT-bigG one, the layout of SDXL embeddings in ComfyUI (each of its two SDXL
    tokenizers reads its own key in ``load_embed``), A1111/Forge and InvokeAI. diffusers'
    ``load_textual_inversion`` takes one tensor per call, with the token named: load ``clip_l`` into
    ``text_encoder`` / ``tokenizer`` and ``clip_g`` into ``text_encoder_2`` / ``tokenizer_2``, both under
    the token (stored in the header, key ``echodistill_export``). The header also carries Stability AI's
    model spec (``modelspec.architecture`` "stable-diffusion-xl-v1-base/textual-inversion").

    Raises ExportError when a row is not finite or its width is not the one of the text states the
    student's UNet config (stored in the bundle) reads; OutputExistsError when `path` exists and not
    `overwrite`.
    """
    target = _target(path, overwrite)
    rows = _embedding_rows(bundle)
    tensors = dict(zip(SDXL_ROW_NAMES, rows)) if bundle.is_sdxl else {bundle.token: rows[0]}
    info = {
        "kind": "embedding",
        "token": bundle.token,
        "class_word": bundle.class_word,
        "initializer": bundle.initializer,
        "text_encoder_fingerprint": bundle.fingerprints.get("text_encoder"),
        "families": bundle.families,
        "step": bundle.step,
        "pack_version": __version__,
    }
    metadata = {}
    if bundle.is_sdxl:
        info["text_encoder_2_fingerprint"] = bundle.fingerprints.get("text_encoder_2")
        metadata.update(_sdxl_spec("textual-inversion", f"EchoDistill {bundle.token}"))
    metadata[EXPORT_METADATA_KEY] = json.dumps(info, sort_keys=True)
    return atomic_save_safetensors(tensors, target, metadata)


EMBEDDING_SUFFIX = "_embedding"  # the embedding's stem when it shares the LoRA's folder


@dataclass(frozen=True)
class ExportTargets:
    """Where `export_concept` writes: the LoRA, the embedding, and the word to write in prompts."""

    lora: Path
    embedding: Path

    @property
    def prompt_word(self) -> str:
        return f"embedding:{self.embedding.stem}"


def export_targets(name: str, lora_dir: str | os.PathLike, embedding_dir: str | os.PathLike | None = None, *,
                   overwrite: bool = False) -> ExportTargets:
    """The two files of an export, refused up front (nothing written) when the name breaks the name rule,
    they would be one file, or one exists and not `overwrite`.

    `<name>.safetensors` in each folder; when both go to one folder (no `embedding_dir`), the embedding is
    `<name>_embedding.safetensors`, so the LoRA and the embedding never replace each other.
    """
    stem = check_name(name)
    lora_dir = Path(lora_dir)
    embedding_dir = Path(embedding_dir) if embedding_dir is not None else lora_dir
    lora = lora_dir / f"{stem}.safetensors"
    embedding = embedding_dir / f"{stem}.safetensors"
    if os.path.abspath(embedding) == os.path.abspath(lora) or (
            embedding.exists() and lora.exists() and os.path.samefile(embedding, lora)):
        embedding = embedding_dir / f"{stem}{EMBEDDING_SUFFIX}.safetensors"
    if not overwrite:
        existing = [str(p) for p in (lora, embedding) if p.exists()]
        if existing:
            verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
            raise OutputExistsError(f"{' and '.join(existing)} already {verb}: pick another name, or pass "
                                    f"overwrite=True to replace {them}", parameters=("overwrite",))
    return ExportTargets(lora, embedding)


def check_stored_shapes(bundle: ConceptBundle) -> None:
    """Check each part's adapter tensors and the token row(s) against the UNet configs the bundle stores (the
    UNets it was trained on; built on meta, no weights), as `export` and `sample` would find them. A bundle
    from before configs were stored is not checked. Raises ExportError naming the first misfit and counting
    the rest."""
    for part in ("student", "teacher"):
        stored = bundle.unet_configs.get(part)
        if not stored or not getattr(bundle, f"{part}_adapter"):
            continue
        layout = export_unet_config(bundle.is_sdxl, bundle.families, part, None, stored)
        check_against_unet({m: tuple(d.shape) for m, d in bundle_deltas(bundle, part).items()}, layout,
                           f"the {part} UNet it was trained on", " (its config, stored in the bundle): the bundle "
                           "was edited or damaged; use the bundle as training saved it")
    _embedding_rows(bundle)


def load_checked_bundle(path: str | os.PathLike) -> ConceptBundle:
    """The bundle at `path`, its tensors checked against the UNet configs it stores (`check_stored_shapes`): an
    edited or damaged file is refused naming itself, the first misfit and how many more, before any model
    reads it (what `inspect` and `sample` do). Raises EchoDistillError (ExportError for a misfit)."""
    bundle = ConceptBundle.load(path)
    try:
        check_stored_shapes(bundle)
    except ExportError as exc:
        raise ExportError(f"{Path(path).name}: {exc}") from None
    return bundle


def _embedding_rows(bundle: ConceptBundle) -> list[torch.Tensor]:
    """The student's token row(s), (1, D) float32 each; ExportError when one is not finite or their width is not
    that of the text states the student's UNet (its config stored in the bundle) reads."""
    rows = [row.detach().float().reshape(1, -1) for row in bundle.embeddings_for("student")]  # (1, D) each
    if not all(torch.isfinite(row).all() for row in rows):
        raise ExportError("the bundle's embedding row is not finite; refusing to export it")
    width = (bundle.unet_configs.get("student") or {}).get("cross_attention_dim")
    if isinstance(width, int) and sum(row.shape[1] for row in rows) != width:  # the text states the UNet reads
        raise ExportError(f"the bundle's embedding row{'s are' if len(rows) > 1 else ' is'} "
                          f"{' + '.join(str(row.shape[1]) for row in rows)} wide but the student it was trained on "
                          f"reads {width}-wide text states: the file was edited or damaged; use a bundle as "
                          "training saved it")
    return rows


def export_concept(bundle: ConceptBundle, name: str, lora_dir: str | os.PathLike,
                   embedding_dir: str | os.PathLike | None = None, *, part: Part = "student",
                   mode: ExportMode = "diff", rank: int | None = None, overwrite: bool = False,
                   unet_config: Mapping | nn.Module | None = None) -> tuple[ExportReport, ExportTargets]:
    """The LoRA and the embedding of `bundle` under one checked name (see `export_targets`), both folders
    probed for writing before either file is written. `unet_config` as in `export_lora`."""
    targets = export_targets(name, lora_dir, embedding_dir, overwrite=overwrite)
    for folder in {targets.lora.parent, targets.embedding.parent}:
        check_writable(folder, "export folder")
    _embedding_rows(bundle)  # a bad row is refused before the LoRA is written: never one file of the two
    report = export_lora(bundle, targets.lora, part=part, mode=mode, rank=rank, overwrite=True,
                         unet_config=unet_config)
    export_embedding(bundle, targets.embedding, overwrite=True)
    return report, targets
