"""ConceptBundle: everything a trained concept needs, in one self-describing safetensors file.

Tensors: ``embedding`` (the token's row), ``student.<param>`` and ``teacher.<param>`` (adapter
weights; none for a part that was not adapted, e.g. Textual Inversion), and ``student_embedding``
only for a concept trained without the shared text encoder (the student's own token row).
SDXL concepts have a row in each text encoder and store them under the names ComfyUI's SDXL
embedding files use: ``clip_l`` (768, CLIP ViT-L) and ``clip_g`` (1280, OpenCLIP ViT-bigG), and
``student_clip_l`` / ``student_clip_g`` for the student's own rows; they have no ``embedding``.
Header metadata key ``echodistill`` holds JSON: token, initializer, class word, adapter kind and
LoRA settings, base-model fingerprints, families, training config, step, pack version, and how many
adapter tensors each part holds. A damaged bundle (a missing, misshapen or non-finite tensor) is refused
when it is read; applying a bundle to models it was not trained on is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from ..errors import EchoDistillError
from ..models.adapters import (LORA_ADAPTER_NAME, adapter_kind, adapter_state_dict, add_custom_diffusion, add_lora,
                               load_adapter_state_dict)
from ..models.concept import add_concept_tokens, concept_embedding, concept_rows, set_concept_rows
from ..models.pair import ModelPair
from ..models.tensor_files import atomic_save_safetensors, fingerprint, open_safetensors
from ..version import __version__

METADATA_KEY = "echodistill"
SDXL_ROW_NAMES = ("clip_l", "clip_g")  # ComfyUI's SDXL embedding keys, in text-encoder order


# Header fields and the JSON types they must have; a header that differs was edited or damaged.
_HEADER_TYPES = {"token": str, "initializer": str, "class_word": str, "adapter": str, "fingerprints": dict,
                 "families": dict, "config": dict, "step": int, "unet_configs": dict, "adapter_tensors": dict, "version": str}
_REQUIRED = ("token", "initializer", "class_word", "adapter", "fingerprints", "families")


def _checked_header(path: Path, header: str) -> dict:
    """The bundle header as a dict; EchoDistillError naming the file for invalid JSON or fields of the wrong type."""
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as exc:
        raise EchoDistillError(f"{path.name}: its '{METADATA_KEY}' header is not valid JSON ({exc}); the file was "
                               "damaged or edited: use the bundle as training wrote it") from None
    problems = [] if isinstance(meta, dict) else ["the header is not a JSON object"]
    if not problems:
        problems = [f"'{k}' is missing" for k in _REQUIRED if k not in meta]
        problems += [f"'{k}' is {_JSON_KINDS.get(type(meta[k]), 'a number')}, not {_JSON_KINDS[t]}"
                     for k, t in _HEADER_TYPES.items() if k in meta and not _is_json_kind(meta[k], t)]
    token = meta.get("token") if not problems else None
    if isinstance(token, str) and (not token or any(ch.isspace() for ch in token)):
        problems.append(f"the token {token!r} is not one word")  # TrainConfig refuses it: no training wrote it
    counts = meta.get("adapter_tensors") if not problems else None
    if isinstance(counts, dict) and not all(isinstance(n, int) and not isinstance(n, bool) for n in counts.values()):
        problems.append(f"'adapter_tensors' holds {counts!r}, not whole numbers")
    step = meta.get("step", 0) if not problems else 0
    if isinstance(step, bool) or (isinstance(step, int) and step < 0):
        problems.append(f"'step' is {step!r}, not a step count")
    if problems:
        raise EchoDistillError(f"{path.name}: a damaged concept header ({'; '.join(problems)}); use the bundle as "
                               "training wrote it")
    version = meta.get("version", "unknown")
    if version != "unknown" and not re.fullmatch(r"\d+(\.\d+)*", version):
        raise EchoDistillError(f"{path.name}: a damaged concept header (the pack version {version!r} is not one "
                               "EchoDistill writes, such as '0.1.0'); use the bundle as training wrote it")
    if _format_line(version) > _format_line(__version__):
        raise EchoDistillError(f"{path.name} was saved by EchoDistill {meta['version']}, newer than this pack "
                               f"({__version__}), whose bundles this pack cannot read: update the pack")
    return meta


# A JSON value's kind in words, by the Python type json.loads gives it.
_JSON_KINDS = {str: "a string", int: "a whole number", float: "a number", dict: "an object", list: "a list",
               bool: "true or false", type(None): "null"}


def _is_json_kind(value, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))  # JSON true is no step count


def _format_line(version: str) -> tuple[int, ...]:
    """The part of a pack version ("0.1.3") that changes when the bundle format may (semantic versioning: the
    major number, and the minor one while the major is 0): "0.1.3" gives (0, 1), "2.4.0" gives (2,). A bundle
    from before versions were written ("unknown") gives (): older than any."""
    if version == "unknown":
        return ()
    numbers = [int(part) for part in version.split(".")[:2]]
    return tuple(numbers if numbers[0] == 0 else numbers[:1])


def _plain_config(config) -> dict:
    """A diffusers config as plain JSON values (tuples become lists; private keys such as _diffusers_version dropped)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def bundle_summary(path: str | os.PathLike) -> list[str] | None:
    """What a concept bundle file holds, in a few lines; None when the file is no bundle (neither an
    ``echodistill`` header nor a bundle's tensors), so callers can try other readings of it. The bundle is
    read as ConceptBundle.load reads it, so every damage that refuses it there (a damaged header, a missing,
    misshapen or non-finite tensor, a stripped header) raises the same EchoDistillError here."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(METADATA_KEY)
            keys = list(handle.keys())
    except Exception:
        return None
    if header is None and not _looks_like_bundle(keys):
        return None
    bundle = ConceptBundle.load(path)
    rows = ("a row in each SDXL text encoder (clip_l, clip_g)" if bundle.is_sdxl
            else "one token row (the shared text encoder's)")
    parts = [part for part in ("student", "teacher") if getattr(bundle, f"{part}_adapter")]
    return [
        f"{Path(path).name}: EchoDistill concept bundle, token {bundle.token!r} "
        f"(class word {bundle.class_word!r}), trained {bundle.step} steps with pack {bundle.version}",
        f"  trained on teacher family {bundle.families.get('teacher')!r}, student family "
        f"{bundle.families.get('student')!r} (a diffusers folder's family is its folder name); {rows}"
        + ("; the student has rows of its own" if bundle.student_embedding is not None else ""),
        f"  adapter {bundle.adapter} on {' and '.join(parts) or 'no UNet'}; "
        "apply it with the pack's nodes or `echodistill sample --concept`, or export it with `echodistill export`",
    ]


_ROW_NAMES = ("embedding", "student_embedding", *SDXL_ROW_NAMES, *(f"student_{n}" for n in SDXL_ROW_NAMES))


def _looks_like_bundle(keys: Iterable[str]) -> bool:
    """Whether tensor names are a concept bundle's (token rows, part-prefixed adapter weights)."""
    keys = list(keys)
    return bool(keys) and any(k in _ROW_NAMES for k in keys) and all(
        k in _ROW_NAMES or k.startswith(("student.", "teacher.")) for k in keys)


# How the adapter tensors of each kind are named: Custom Diffusion's ΔW, peft's LoRA factors.
_ADAPTER_ENDINGS = {"custom_diffusion": (".delta",),
                    "lora": (f".lora_A.{LORA_ADAPTER_NAME}.weight", f".lora_B.{LORA_ADAPTER_NAME}.weight")}


def _tensor_problems(meta: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with a bundle's tensors given its header: token rows missing or not one vector of one width,
    tensors no bundle has, adapter weights missing against the counts the header records, non-float or
    non-finite values. Empty for a bundle as training wrote it."""
    sdxl = all(name in tensors for name in SDXL_ROW_NAMES)
    problems = [] if sdxl or "embedding" in tensors else [
        "no token row (an 'embedding' tensor, or 'clip_l' and 'clip_g' for SDXL)"]
    unexpected = [repr(k) for k in sorted(tensors) if k not in _ROW_NAMES and not k.startswith(("student.", "teacher."))]
    if unexpected:
        problems.append(f"{'an unexpected tensor' if len(unexpected) == 1 else 'unexpected tensors'} "
                        f"{_some(unexpected)}")
    for name in (n for n in _ROW_NAMES if n in tensors):
        shared = name.removeprefix("student_")
        if tensors[name].ndim != 1:
            problems.append(f"token row {name!r} has shape {tuple(tensors[name].shape)}, not one vector")
        elif name != shared and shared in tensors and tensors[shared].shape != tensors[name].shape:
            problems.append(f"token row {name!r} is {tensors[name].numel()} wide, {shared!r} {tensors[shared].numel()}")
    adapter = meta.get("adapter")
    if adapter not in _ADAPTER_ENDINGS:
        problems.append(f"the adapter {adapter!r} is not one of {', '.join(map(repr, _ADAPTER_ENDINGS))}")
    else:  # tensors of the other kind: a header edited or copied from another bundle
        foreign = [repr(k) for k in sorted(tensors) if k.startswith(("student.", "teacher."))
                   and not k.endswith(_ADAPTER_ENDINGS[adapter])]
        if foreign:
            problems.append(f"the header says {adapter!r} but {_some(foreign)} "
                            f"{'is not one of its' if len(foreign) == 1 else 'are not its'} tensors")
    for part, expected in (meta.get("adapter_tensors") or {}).items():  # older bundles have no counts: not checked
        found = sum(k.startswith(f"{part}.") for k in tensors)
        if found != expected:
            problems.append(f"{found} {part} adapter tensor(s) where the header records {expected}")
    not_floats = [f"{name!r} holds {tensor.dtype} values" for name, tensor in tensors.items()
                  if tensor.dtype not in _FLOATS]
    not_finite = [repr(name) for name, tensor in tensors.items()
                  if tensor.dtype in _FLOATS and not torch.isfinite(tensor).all()]
    if not_floats:
        problems.append(f"{_some(not_floats)}, not fp16, bf16 or fp32 floats")
    if not_finite:
        problems.append(f"{_some(not_finite)} {'holds' if len(not_finite) == 1 else 'hold'} NaN or infinite values")
    return problems


# The float types a bundle is read in (training writes fp32; fp16/bf16/fp64 copies read the same). fp8 is not:
# torch cannot even test it for NaN, and its 3-bit mantissa would not hold a K/V delta.
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _some(items: list[str], shown: int = 3) -> str:
    """The first `shown` of `items` and how many more: a damaged bundle's hundreds of tensors in one line."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more tensor(s)" if more > 0 else "")


class BundleMismatchError(EchoDistillError):
    """A bundle is applied to base models other than the ones it was trained on."""


@dataclass
class ConceptBundle:
    token: str
    initializer: str
    class_word: str
    embedding: torch.Tensor  # (D,)
    adapter: str
    student_adapter: dict[str, torch.Tensor]
    teacher_adapter: dict[str, torch.Tensor]
    fingerprints: dict[str, str]
    families: dict[str, str]
    config: dict = field(default_factory=dict)
    step: int = 0
    version: str = __version__
    student_embedding: torch.Tensor | None = None  # (D,) the student's own row (shared_text_encoder=False)
    embedding_2: torch.Tensor | None = None  # (1280,) SDXL: the row in the second (OpenCLIP ViT-bigG) encoder
    student_embedding_2: torch.Tensor | None = None  # (1280,) SDXL: the student's own second row
    # SDXL: {"teacher"|"student": the UNet's diffusers config}, so an export can name its SGM keys for any
    # SDXL family, shipped or not (SD 1.x / 2.x exports use diffusers names and need none)
    unet_configs: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_trained_pair(cls, pair: ModelPair, config, step: int, *, teacher_adapter: dict[str, torch.Tensor],
                          student_embedding: torch.Tensor | None = None,
                          student_embeddings: Sequence[torch.Tensor] | None = None) -> "ConceptBundle":
        """What a training run leaves on `pair` (token row(s), student adapter), with the run's config and provenance.

        `student_embeddings`: the student's own rows, one per text encoder (shared_text_encoder=False);
        `student_embedding` is the one-encoder spelling of the same.
        """
        rows = [row.detach().clone() for row in concept_rows(pair.text_encoders)]  # (D_1,), [(D_2,)]
        own = list(student_embeddings) if student_embeddings is not None else (
            None if student_embedding is None else [student_embedding])
        return cls(
            token=config.token,
            initializer=config.initializer_word,
            class_word=config.class_word,
            embedding=rows[0],
            embedding_2=rows[1] if len(rows) > 1 else None,
            adapter=config.adapter,
            student_adapter=adapter_state_dict(pair.student.unet),
            teacher_adapter=teacher_adapter,
            fingerprints={**pair.fingerprints(), "initializer_rows": initializer_fingerprint(pair, config.initializer_word)},
            families={"teacher": pair.teacher.family, "student": pair.student.family},
            config=config.to_dict(),
            step=step,
            student_embedding=None if own is None else own[0].detach().clone(),
            student_embedding_2=None if own is None or len(own) < 2 else own[1].detach().clone(),
            unet_configs={part: _plain_config(getattr(pair, part).unet.config) for part in ("teacher", "student")},
        )

    @property
    def is_sdxl(self) -> bool:
        """Trained on an SDXL pair: a row in each of the two text encoders."""
        return self.embedding_2 is not None

    def embedding_for(self, part: str) -> torch.Tensor:
        """The first text encoder's token row `part` ("student" or "teacher") reads the prompts with."""
        if part == "student" and self.student_embedding is not None:
            return self.student_embedding
        return self.embedding

    def embeddings_for(self, part: str) -> tuple[torch.Tensor, ...]:
        """Every token row `part` reads the prompts with, one per text encoder: (D,) or, for SDXL,
        ((768,) CLIP ViT-L row, (1280,) OpenCLIP ViT-bigG row)."""
        if not self.is_sdxl:
            return (self.embedding_for(part),)
        if part == "student" and self.student_embedding is not None:
            return (self.student_embedding, self.student_embedding_2)
        return (self.embedding, self.embedding_2)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The token rows under their file names: {"embedding"} (SD 1.x / 2.x) or {"clip_l", "clip_g"} (SDXL),
        each with a "student_" twin when the student has rows of its own; float32."""
        if not self.is_sdxl:
            rows = {"embedding": self.embedding}
            if self.student_embedding is not None:
                rows["student_embedding"] = self.student_embedding
        else:
            rows = dict(zip(SDXL_ROW_NAMES, (self.embedding, self.embedding_2)))
            if self.student_embedding is not None:
                rows.update({f"student_{n}": r for n, r in
                             zip(SDXL_ROW_NAMES, (self.student_embedding, self.student_embedding_2))})
        return {k: v.float() for k, v in rows.items()}

    # --- file ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "token": self.token,
            "initializer": self.initializer,
            "class_word": self.class_word,
            "adapter": self.adapter,
            "fingerprints": self.fingerprints,
            "families": self.families,
            "config": self.config,
            "step": self.step,
            "version": self.version,
            "adapter_tensors": {"student": len(self.student_adapter), "teacher": len(self.teacher_adapter)},
            **({"unet_configs": self.unet_configs} if self.unet_configs else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        tensors = self.tensors()
        tensors.update({f"student.{k}": v for k, v in self.student_adapter.items()})
        tensors.update({f"teacher.{k}": v for k, v in self.teacher_adapter.items()})
        return atomic_save_safetensors(tensors, path, {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptBundle":
        path = Path(path)
        if path.is_dir():
            raise EchoDistillError(f"{path} is a folder, not a concept bundle: give its .safetensors file")
        if not path.is_file():
            raise EchoDistillError(f"concept bundle not found: {path}")
        with open_safetensors(path, EchoDistillError, "copy the bundle again, or train the concept anew") as handle:
            header = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if header is None:
            stripped = _looks_like_bundle(tensors)
            raise EchoDistillError(
                f"{path.name} has a concept bundle's tensors but no '{METADATA_KEY}' header: a tool re-saved it "
                "without its metadata; use the bundle as training wrote it" if stripped else
                f"{path.name} is not an EchoDistill concept bundle (no '{METADATA_KEY}' header)")
        meta = _checked_header(path, header)
        problems = _tensor_problems(meta, tensors)
        if problems:
            raise EchoDistillError(f"{path.name}: a damaged concept bundle ({'; '.join(problems)}); use the bundle as "
                                   "training wrote it, or train it again")
        sdxl = all(name in tensors for name in SDXL_ROW_NAMES)
        first, second = SDXL_ROW_NAMES
        return cls(
            token=meta["token"],
            initializer=meta["initializer"],
            class_word=meta["class_word"],
            embedding=tensors[first] if sdxl else tensors["embedding"],
            embedding_2=tensors[second] if sdxl else None,
            student_embedding_2=tensors.get(f"student_{second}"),
            adapter=meta["adapter"],
            student_adapter={k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")},
            teacher_adapter={k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")},
            fingerprints=meta["fingerprints"],
            families=meta["families"],
            config=meta.get("config", {}),
            step=meta.get("step", 0),
            version=meta.get("version", "unknown"),
            student_embedding=tensors.get(f"student_{first}" if sdxl else "student_embedding"),
            unet_configs=meta.get("unet_configs", {}),
        )

    # --- applying ----------------------------------------------------------------------------
    def check_base(self, pair: ModelPair, parts: Iterable[str] = ("student", "teacher")) -> None:
        """Refuse base models whose fingerprints differ from the ones the concept was trained on.

        The UNet fingerprints cover the cross-attention K/V the adapters modify (a checkpoint with a LoRA
        merged into them is another base model); the text encoder's cover its table and the initializer's rows.
        A bundle from a version before K/V were hashed is checked as it was then (the UNets' ends only).
        """
        if self.is_sdxl != (len(pair.text_encoders) == 2):
            trained = "an SDXL pair (a token row in each of two text encoders)" if self.is_sdxl else (
                "an SD 1.x / 2.x pair (one text encoder)")
            loaded = "an SDXL pair" if len(pair.text_encoders) == 2 else "an SD 1.x / 2.x pair"
            raise BundleMismatchError(
                f"this concept was trained on {trained}, {self.families}, but the loaded models are {loaded} "
                f"({pair.teacher.family} + {pair.student.family}): load the same base models it was trained with"
            )
        legacy = "scheme" not in self.fingerprints
        have = pair.legacy_fingerprints() if legacy else pair.fingerprints()
        encoders = ["text_encoder", *(["text_encoder_2"] if self.is_sdxl else [])]
        for name in [*encoders, *(f"{p}_unet" for p in parts)]:
            if have.get(name) is None and legacy:
                raise BundleMismatchError(
                    f"this concept was saved by an older version (pack {self.version}) whose fingerprints cannot be "
                    "checked against these models: load the base models with load_model_pair, or retrain the concept"
                )
            if self.fingerprints.get(name) != have[name]:
                weights = "its cross-attention K/V or other weights" if name.endswith("unet") else "its weights"
                raise BundleMismatchError(
                    f"this concept was trained on a {name.replace('_', ' ')} with fingerprint "
                    f"{self.fingerprints.get(name)}, but the loaded one is {have[name]} ({weights} differ: another "
                    f"checkpoint, or a LoRA merged into it): load the same base models it was trained with "
                    f"({self.families}), without merged LoRAs"
                )
        saved_rows = self.fingerprints.get("initializer_rows")
        if saved_rows is not None and saved_rows != initializer_fingerprint(pair, self.initializer):
            raise BundleMismatchError(
                f"the loaded text encoder's rows for the initializer {self.initializer!r} differ from the ones this "
                f"concept was trained with: load the same base models it was trained with ({self.families})"
            )

    def apply(self, pair: ModelPair, parts: Iterable[str] = ("student", "teacher")) -> None:
        """Add the token (or reuse it), set its row, and install + load the adapters of `parts`.

        A part with no adapter weights (Textual Inversion) runs its base UNet with the token row.
        Applied with inference mode off, so the pair can still be trained and tracked afterwards.
        """
        with torch.inference_mode(False):
            self._apply(pair, tuple(parts))

    def _apply(self, pair: ModelPair, parts: tuple[str, ...]) -> None:
        rows = {id(self.embedding_for(part)) for part in parts}
        if len(rows) > 1:
            raise EchoDistillError(
                "this concept was trained without a shared text encoder: the teacher and the student read the "
                "token through different rows, so apply one part at a time (parts=('student',) or ('teacher',))"
            )
        self.check_base(pair, parts)
        if self.token not in pair.tokenizer.get_vocab():
            add_concept_tokens(pair.tokenizers, pair.text_encoders, self.token, self.initializer)
        elif any(concept_embedding(e).token_id != t.convert_tokens_to_ids(self.token)
                 for t, e in zip(pair.tokenizers, pair.text_encoders)):
            raise EchoDistillError(f"the text encoder carries another concept than {self.token!r}; load fresh models")
        set_concept_rows(pair.text_encoders, self.embeddings_for(parts[0] if parts else "teacher"))
        for part in parts:
            unet = getattr(pair, part).unet
            state = self.student_adapter if part == "student" else self.teacher_adapter
            if not state and adapter_kind(unet) is None:
                continue
            if adapter_kind(unet) is None:
                self._install(unet)
            load_adapter_state_dict(unet, state)

    def _install(self, unet) -> None:
        if self.adapter == "custom_diffusion":
            add_custom_diffusion(unet)
        else:
            lora = self.config
            add_lora(unet, lora.get("lora_rank", 4), lora.get("lora_alpha", 4.0), tuple(lora.get("lora_targets", ())))
        for param in unet.parameters():
            param.requires_grad_(False)


def initializer_fingerprint(pair: ModelPair, initializer: str) -> str:
    """Hash of the token-table rows of the initializer word's ids in the pair's (frozen) table(s).

    SD 1.x / 2.x: the one table's rows (names "<id>"); SDXL adds the second table's (names "2:<id>").
    """
    names, rows = [], {}
    for index, (tokenizer, encoder) in enumerate(zip(pair.tokenizers, pair.text_encoders)):
        table = encoder.get_input_embeddings().weight  # (V, D): the base table, concept row not in it
        for token_id in tokenizer(initializer, add_special_tokens=False).input_ids:
            name = str(token_id) if index == 0 else f"{index + 1}:{token_id}"
            names.append(name)
            rows[name] = table[token_id]
    return fingerprint(lambda name: rows[name], names)
