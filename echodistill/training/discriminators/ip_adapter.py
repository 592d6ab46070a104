"""IP-Adapter's frozen image projection: CLIP image embeddings as cross-attention tokens.

The CLIP discriminator reads its semantic loss through it when an IP-Adapter file is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from echodistill.errors import BackboneError
from echodistill.models.tensor_files import open_safetensors


class IPAdapterImageProjection(nn.Module):
    """IP-Adapter's image projection: CLIP image_embeds (B, D_clip) -> (B, tokens, D_cross).

    proj: Linear(D_clip, tokens·D_cross), reshape into tokens, LayerNorm over D_cross.
    """

    def __init__(self, clip_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.clip_embed_dim = clip_embed_dim
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def train(self, mode: bool = True) -> "IPAdapterImageProjection":
        return super().train(False)  # frozen: always eval

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds.to(self.proj.weight.dtype))  # (B, T·D_cross)
        tokens = tokens.reshape(-1, self.num_tokens, self.cross_attention_dim)  # (B, T, D_cross)
        return self.norm(tokens)


def load_ip_adapter_image_projection(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                                     device: str | torch.device = "cpu") -> IPAdapterImageProjection:
    """Load the frozen image projection of an IP-Adapter ``.safetensors`` or ``.bin`` file.

    Accepts flat ``image_proj.*`` keys (safetensors) or a ``{"image_proj": {...}}`` dict (the
    original ``.bin``, read with ``weights_only=True``). Plus/FaceID adapters (a Resampler
    instead of one Linear) are refused.
    """
    path = Path(path)
    hint = ("an IP-Adapter file such as ip-adapter_sd15.safetensors (or .bin) from "
            "ComfyUI's models/ipadapter folder")
    if not path.is_file():
        raise BackboneError(f"IP-Adapter file not found at {path}; the CLIP discriminator's "
                            f"projection needs {hint}")
    if path.suffix == ".safetensors":
        with open_safetensors(path, BackboneError, f"use {hint}") as f:
            state = {k[len("image_proj."):]: f.get_tensor(k) for k in f.keys() if k.startswith("image_proj.")}
    elif path.suffix in (".bin", ".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
            raise BackboneError(f"{path} is not a readable PyTorch file (truncated, damaged, or a pickle that is not "
                                f"plain weights: {type(exc).__name__}); use {hint}") from None
        if not isinstance(raw, dict):
            raise BackboneError(f"{path} does not hold a state dict; use {hint}")
        if isinstance(raw.get("image_proj"), dict):
            state = dict(raw["image_proj"])
        else:
            state = {k[len("image_proj."):]: v for k, v in raw.items() if k.startswith("image_proj.")}
    else:
        raise BackboneError(f"{path} is not a .safetensors or .bin file; use {hint}")
    needed = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    if not all(k in state for k in needed):
        kind = " (a Plus/FaceID Resampler projection, not supported)" if "latents" in state else ""
        raise BackboneError(f"{path} has no basic IP-Adapter image projection{kind}; expected "
                            f"image_proj.{{{', '.join(needed)}}}; use {hint}")
    out_features, clip_dim = state["proj.weight"].shape
    cross_dim = state["norm.weight"].shape[0]
    if out_features % cross_dim:
        raise BackboneError(f"{path}: projection width {out_features} is not a multiple of the "
                            f"norm width {cross_dim}; the file is damaged or not an IP-Adapter")
    module = IPAdapterImageProjection(clip_dim, cross_dim, out_features // cross_dim)
    module.load_state_dict({k: state[k] for k in needed})
    return module.requires_grad_(False).eval().to(device=device, dtype=dtype)
