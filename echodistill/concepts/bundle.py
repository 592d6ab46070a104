"""ConceptBundle: everything a trained concept needs, in one self-describing safetensors file.

Tensors: ``embedding`` (the token's row), ``student.<param>`` and ``teacher.<param>`` (adapter
weights; none for a part that was not adapted, e.g. Textual Inversion), and ``student_embedding``
only for a concept trained without the shared text encoder (the student's own token row).
Header metadata key ``echodistill`` holds JSON: token, initializer, class word, adapter kind and
LoRA settings, base-model fingerprints, families, training config, step, pack version. Applying
a bundle to models it was not trained on is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..errors import EchoDistillError
from ..models.adapters import adapter_kind, adapter_state_dict, add_custom_diffusion, add_lora, load_adapter_state_dict
from ..models.concept import add_concept_token, concept_embedding, set_concept_row
from ..models.pair import ModelPair
from ..models.tensor_files import atomic_save_safetensors, fingerprint
from ..version import __version__

METADATA_KEY = "echodistill"


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

    @classmethod
    def from_trained_pair(cls, pair: ModelPair, config, step: int, *, teacher_adapter: dict[str, torch.Tensor],
                          student_embedding: torch.Tensor | None = None) -> "ConceptBundle":
        """What a training run leaves on `pair` (token row, student adapter), with the run's config and provenance."""
        return cls(
            token=config.token,
            initializer=config.initializer_word,
            class_word=config.class_word,
            embedding=concept_embedding(pair.text_encoder).concept_row.detach().clone(),
            adapter=config.adapter,
            student_adapter=adapter_state_dict(pair.student.unet),
            teacher_adapter=teacher_adapter,
            fingerprints={**pair.fingerprints(), "initializer_rows": initializer_fingerprint(pair, config.initializer_word)},
            families={"teacher": pair.teacher.family, "student": pair.student.family},
            config=config.to_dict(),
            step=step,
            student_embedding=None if student_embedding is None else student_embedding.detach().clone(),
        )

    def embedding_for(self, part: str) -> torch.Tensor:
        """The token row `part` ("student" or "teacher") reads the prompts with."""
        if part == "student" and self.student_embedding is not None:
            return self.student_embedding
        return self.embedding

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
        }

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"embedding": self.embedding.float()}
        if self.student_embedding is not None:
            tensors["student_embedding"] = self.student_embedding.float()
        tensors.update({f"student.{k}": v for k, v in self.student_adapter.items()})
        tensors.update({f"teacher.{k}": v for k, v in self.teacher_adapter.items()})
        return atomic_save_safetensors(tensors, path, {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptBundle":
        path = Path(path)
        if not path.is_file():
            raise EchoDistillError(f"concept bundle not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = (handle.metadata() or {}).get(METADATA_KEY)
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise EchoDistillError(f"{path.name} is not a readable safetensors file: {exc}") from exc
        if header is None or "embedding" not in tensors:
            raise EchoDistillError(f"{path.name} is not an EchoDistill concept bundle (no '{METADATA_KEY}' header)")
        meta = json.loads(header)
        return cls(
            token=meta["token"],
            initializer=meta["initializer"],
            class_word=meta["class_word"],
            embedding=tensors["embedding"],
            adapter=meta["adapter"],
            student_adapter={k[len("student.") :]: v for k, v in tensors.items() if k.startswith("student.")},
            teacher_adapter={k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")},
            fingerprints=meta["fingerprints"],
            families=meta["families"],
            config=meta.get("config", {}),
            step=meta.get("step", 0),
            version=meta.get("version", "unknown"),
            student_embedding=tensors.get("student_embedding"),
        )

    # --- applying ----------------------------------------------------------------------------
    def check_base(self, pair: ModelPair, parts: Iterable[str] = ("student", "teacher")) -> None:
        """Refuse base models whose fingerprints differ from the ones the concept was trained on.

        The UNet fingerprints cover the cross-attention K/V the adapters modify (a checkpoint with a LoRA
        merged into them is another base model); the text encoder's cover its table and the initializer's rows.
        A bundle from a version before K/V were hashed is checked as it was then (the UNets' ends only).
        """
        legacy = "scheme" not in self.fingerprints
        have = pair.legacy_fingerprints() if legacy else pair.fingerprints()
        for name in ["text_encoder", *(f"{p}_unet" for p in parts)]:
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
            add_concept_token(pair.tokenizer, pair.text_encoder, self.token, self.initializer)
        elif concept_embedding(pair.text_encoder).token_id != pair.tokenizer.convert_tokens_to_ids(self.token):
            raise EchoDistillError(f"the text encoder carries another concept than {self.token!r}; load fresh models")
        set_concept_row(pair.text_encoder, self.embedding_for(parts[0]) if parts else self.embedding)
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
    """Hash of the token-table rows of the initializer word's ids in the pair's (frozen) table."""
    ids = pair.tokenizer(initializer, add_special_tokens=False).input_ids
    table = pair.text_encoder.get_input_embeddings().weight  # (V, D): the base table, concept row not in it
    return fingerprint(lambda name: table[int(name)], [str(i) for i in ids])
