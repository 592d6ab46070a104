"""ΔW of a concept's adapters, read from its bundle without any model: per-layer weight deltas, the
LoRA factors they come from, and the best rank-r factors of a delta (what the LoRA export writes)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ..models.adapters import LORA_ADAPTER_NAME
from .bundle import ConceptBundle
from .kohya_keys import ExportError

Part = Literal["student", "teacher"]

_PEFT_A = f".lora_A.{LORA_ADAPTER_NAME}.weight"
_PEFT_B = f".lora_B.{LORA_ADAPTER_NAME}.weight"


def _part_state(bundle: ConceptBundle, part: str) -> dict[str, torch.Tensor]:
    if part not in get_args(Part):
        raise ExportError(f"part={part!r} is not one of {', '.join(map(repr, get_args(Part)))}", parameters=("part",))
    return bundle.student_adapter if part == "student" else bundle.teacher_adapter


def _peft_module(key: str, suffix: str) -> str:
    # peft names the wrapped Linear `<module>.base_layer`; the LoRA belongs to `<module>` itself.
    return key[: -len(suffix)].replace(".base_layer", "")


def lora_factors(bundle: ConceptBundle, part: str = "student") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (down (r, in), up (out, r), alpha) of a peft LoRA bundle, fp32."""
    if bundle.adapter != "lora":
        raise ExportError(f"the bundle's adapter is {bundle.adapter!r}, not 'lora'")
    state = _part_state(bundle, part)
    downs = {_peft_module(k, _PEFT_A): v for k, v in state.items() if k.endswith(_PEFT_A)}
    ups = {_peft_module(k, _PEFT_B): v for k, v in state.items() if k.endswith(_PEFT_B)}
    other = sorted(k for k in state if not k.endswith((_PEFT_A, _PEFT_B)))
    if other or set(downs) != set(ups):
        unpaired = sorted(set(downs) ^ set(ups))
        raise ExportError(
            f"cannot export the {part} LoRA: unsupported tensors {other[:2]}, unpaired modules {unpaired[:2]}"
        )
    # Same defaults as ConceptBundle.apply, so the export equals what applying the bundle gives.
    alpha = float(bundle.config.get("lora_alpha", 4.0))
    factors = {}
    for module, down in downs.items():
        rank = down.shape[0]
        if "lora_rank" in bundle.config and int(bundle.config["lora_rank"]) != rank:
            raise ExportError(
                f"{module}: lora_A has rank {rank} but the bundle config says lora_rank={bundle.config['lora_rank']}"
            )
        up = ups[module]
        if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ExportError(f"{module}: a conv LoRA's lora_B must be 1x1, got {tuple(up.shape)}")
        factors[module] = (down.float(), up.float(), alpha)
    return factors


def factor_product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up @ down for a Linear (down (r, in), up (out, r)) or a conv layer in kohya's layout
    (down (r, in, kh, kw), up (out, r, 1, 1)): the ΔW of the layer's weight shape, before scale."""
    if down.dim() == 2:
        return up @ down
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def bundle_deltas(bundle: ConceptBundle, part: str = "student") -> dict[str, torch.Tensor]:
    """module name -> ΔW (fp32, shape of the layer's weight: Linear or conv) of one part of a bundle."""
    state = _part_state(bundle, part)
    if bundle.adapter == "lora":
        return {m: (alpha / down.shape[0]) * factor_product(down, up)
                for m, (down, up, alpha) in lora_factors(bundle, part).items()}
    if bundle.adapter != "custom_diffusion":
        raise ExportError(f"unknown bundle adapter {bundle.adapter!r}: expected 'custom_diffusion' or 'lora'")
    other = sorted(k for k in state if not k.endswith(".delta"))
    if other:
        raise ExportError(f"custom-diffusion bundle holds non-delta tensors, e.g. {other[:2]}")
    return {k[: -len(".delta")]: v.float() for k, v in state.items()}


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r, in), up (out, r), relative Frobenius error) of the best rank-r approximation.

    r is capped at min(out, in), where the fit is exact and needs no SVD: ΔW = I·ΔW (down = ΔW,
    up = I, when out <= in) or ΔW·I (down = I, up = ΔW), error 0, and as kind to fp16 loaders as a
    ``.diff`` (the identity is exact in any precision). Full rank is the default export, and an SVD of
    each of SDXL's 140 K/V layers (up to 1280 x 2048) would take minutes on a CPU.
    Below that: truncated SVD in float64; the singular values are split evenly between the factors so
    neither carries the whole scale (kinder to fp16 loaders). The error is measured on the
    fp32 factors actually written.
    A conv ΔW (out, in, kh, kw) is fitted as (out, in·kh·kw) and returned in kohya's conv
    layout: down (r, in, kh, kw), up (out, r, 1, 1).
    """
    if delta.dim() == 4:
        down, up, error = low_rank_factors(delta.flatten(1), rank)
        return down.reshape(down.shape[0], *delta.shape[1:]), up[:, :, None, None], error
    out_features, in_features = delta.shape
    if rank >= min(out_features, in_features):
        exact = delta.detach().float().cpu().clone()  # (out, in)
        if out_features <= in_features:
            return exact, torch.eye(out_features), 0.0  # down (out, in), up (out, out)
        return torch.eye(in_features), exact, 0.0  # down (in, in), up (out, in)
    target = delta.detach().double().cpu()  # (out, in)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()  # (out, r)
    down = (root[:, None] * vh[:r]).float()  # (r, in)
    norm = torch.linalg.matrix_norm(target)
    residual = torch.linalg.matrix_norm(target - up.double() @ down.double())
    return down, up, float(residual / norm) if norm > 0 else 0.0
