"""The discriminator ensemble: named members, each a frozen feature extractor + a trainable head.

Image members (DINO, DINOv2, CLIP-H, optionally CLIP-H followed by an IP-Adapter projection)
judge decoded images in [-1, 1]; the ``teacher_features`` member judges noised latents with the
teacher UNet's own encoder. ``forward`` returns one (B, 2) logits tensor per member, so the
trainer weights each member once (paper: 1.0 each), whatever its inner structure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
import torch.nn as nn

from echodistill.errors import BackboneError
from echodistill.models.backbones import BACKBONES, FrozenBackbone, load_backbone
from echodistill.models.conditioning import Conditioning

from .heads import DiscriminatorHead
from .ip_adapter import load_ip_adapter_image_projection
from .teacher_features import TeacherFeatureDiscriminator


@dataclass(frozen=True)
class MemberKind:
    """What a member judges and what it needs to be built."""

    inputs: Literal["images", "latents"] = field(metadata={"help": "decoded images or noised latents"})
    help: str = field(metadata={"help": "one line for node tooltips"})


TEACHER_FEATURES = "teacher_features"

MEMBER_KINDS: dict[str, MemberKind] = {
    **{name: MemberKind("images", f"{spec.description} features (needs {spec.file_hint})")
       for name, spec in BACKBONES.items()},
    TEACHER_FEATURES: MemberKind("latents", "the frozen teacher UNet's encoder features; no extra files"),
}


class BackboneDiscriminator(nn.Module):
    """Image member: frozen backbone (-> optional frozen projection) -> trainable head.

    With an IP-Adapter projection the head sees its (tokens, D_cross) output flattened, i.e.
    exactly what the UNet's image cross-attention would see.
    """

    inputs = "images"

    def __init__(self, backbone: FrozenBackbone, *, projection: nn.Module | None = None,
                 hidden_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        feature_dim = backbone.feature_dim
        if projection is not None:
            if projection.clip_embed_dim != feature_dim:
                raise BackboneError(
                    f"the IP-Adapter projection expects {projection.clip_embed_dim}-d CLIP image "
                    f"embeddings but {backbone.name} gives {feature_dim}-d; use the IP-Adapter made "
                    f"for this image encoder"
                )
            feature_dim = projection.num_tokens * projection.cross_attention_dim
        self.head = DiscriminatorHead(feature_dim, hidden_dim)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (B, D)
        if self.projection is not None:
            features = self.projection(features).flatten(1).float()  # (B, T·D_cross)
        return self.head(features)  # (B, 2)


class DiscriminatorEnsemble(nn.Module):
    """Named members judged together; ``forward`` -> {name: (B, 2) logits}, column 1 = real.

    The ``teacher_features`` member's per-level logits (B, levels, 2) are averaged over levels
    into one (B, 2) entry, so it counts as one discriminator like the others (and its heads
    are trained jointly, as one ensemble). Every member's inputs must be passed: a missing
    input raises instead of silently dropping that member from the loss. ``needs_images``
    tells the trainer whether it must decode latents at all.

    A member is any module with an ``inputs`` attribute ("images" or "latents") and a
    ``head_parameters()`` method, like :class:`BackboneDiscriminator` and
    :class:`TeacherFeatureDiscriminator`.
    """

    def __init__(self, members: Mapping[str, nn.Module]):
        super().__init__()
        if not members:
            raise BackboneError("a discriminator ensemble needs at least one member; valid kinds: "
                                f"{', '.join(MEMBER_KINDS)}")
        self.members = nn.ModuleDict(members)

    @property
    def needs_images(self) -> bool:
        return any(m.inputs == "images" for m in self.members.values())

    @property
    def needs_latents(self) -> bool:
        return any(m.inputs == "latents" for m in self.members.values())

    def heads_parameters(self) -> list[nn.Parameter]:
        """The only trainable parameters: every member's head(s)."""
        return [p for m in self.members.values() for p in m.head_parameters()]

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Head weights only (frozen backbones are rebuilt from their files), for checkpoints."""
        trainable = {id(p) for p in self.heads_parameters()}
        return {name: p.detach().clone() for name, p in self.named_parameters() if id(p) in trainable}

    def load_heads_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.heads_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise BackboneError(f"saved discriminator heads do not match this ensemble (missing "
                                f"{missing[:3]}, unexpected {extra[:3]}); build it with the same members")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def forward(self, images: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None,
                encoder_hidden_states: Conditioning | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1]; noised latents (B, 4, h, w) with their timesteps and
        prompt conditioning (a `Conditioning`, or prompt states (B, L, D)). Returns {member name: (B, 2) logits}."""
        logits = {}
        for name, member in self.members.items():
            if member.inputs == "images":
                if images is None:
                    raise BackboneError(f"discriminator member {name!r} judges images; pass images=",
                                         parameters=("images",))
                logits[name] = member(images)  # (B, 2)
            else:
                if latents is None or timesteps is None or encoder_hidden_states is None:
                    raise BackboneError(f"discriminator member {name!r} judges noised latents; pass "
                                        f"latents=, timesteps= and encoder_hidden_states=")
                logits[name] = member(latents, timesteps, encoder_hidden_states).mean(dim=1)  # (B, 2)
        return logits


def build_ensemble(members: Sequence[tuple[str, str | os.PathLike | None]], *,
                   teacher_unet: nn.Module | None = None,
                   ip_adapter_path: str | os.PathLike | None = None, hidden_dim: int = 512,
                   dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> DiscriminatorEnsemble:
    """Build an ensemble from ``(kind, path)`` pairs; kinds are the keys of ``MEMBER_KINDS``.

    Image kinds load their backbone from ``path`` (see :func:`load_backbone`) in ``dtype``;
    ``("teacher_features", None)`` wraps ``teacher_unet``. ``ip_adapter_path`` puts a frozen
    IP-Adapter image projection after the ``clip_vit_h14`` member. Heads are float32 on
    ``device``; member names in the output are the kind names.
    """
    built: dict[str, nn.Module] = {}
    for kind, path in members:
        if kind not in MEMBER_KINDS:
            raise BackboneError(f"unknown discriminator {kind!r}; valid names: {', '.join(MEMBER_KINDS)}")
        if kind in built:
            raise BackboneError(f"discriminator {kind!r} is listed twice; list each kind once")
        if kind == TEACHER_FEATURES:
            if teacher_unet is None:
                raise BackboneError("the 'teacher_features' discriminator needs the teacher UNet; "
                                    "pass teacher_unet=")
            built[kind] = TeacherFeatureDiscriminator(teacher_unet, hidden_dim).to(device)
            continue
        if path is None:
            raise BackboneError(f"discriminator {kind!r} needs a weights path: "
                                f"{BACKBONES[kind].file_hint}")
        backbone = load_backbone(kind, path, dtype=dtype, device=device)
        projection = None
        if ip_adapter_path is not None and kind == "clip_vit_h14":
            projection = load_ip_adapter_image_projection(ip_adapter_path, dtype=dtype, device=device)
        built[kind] = BackboneDiscriminator(backbone, projection=projection,
                                            hidden_dim=hidden_dim).to(device)
    if ip_adapter_path is not None and "clip_vit_h14" not in built:
        raise BackboneError("ip_adapter_path was given but no 'clip_vit_h14' discriminator is "
                            "listed; the IP-Adapter projection reads CLIP image embeddings")
    return DiscriminatorEnsemble(built)
