"""A discriminator that needs no extra weights: heads on the frozen teacher UNet's encoder.

Most users have no DINO / DINOv2 / CLIP-H files. The teacher (SD 2.1) already holds a strong
image encoder in its down path, and it works on noised latents, so this member also skips the
VAE decode. Real and fake latents are noised to the same timestep by the caller and encoded
with the same prompt embeddings; each encoder level is average-pooled and judged by its own
:class:`DiscriminatorHead`.

The teacher is held by reference, not registered as a submodule: its weights are neither in
this module's ``parameters()`` nor in its ``state_dict()``, and ``.to()`` does not move it (its
owner does). Its cross-attention K/V train elsewhere, so they may have ``requires_grad=True``;
every piece of the UNet is therefore called with *detached* parameters
(``torch.func.functional_call``), and gradients reach only the input latents and the heads.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.func import functional_call

from echodistill.errors import BackboneError
from echodistill.models.conditioning import Conditioning, as_conditioning

from .heads import DiscriminatorHead


def _frozen_call(module: nn.Module, *args, **kwargs):
    """Run ``module`` with detached views of its parameters: no gradient reaches them."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args, kwargs)


@contextlib.contextmanager
def _no_gradient_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Switch the UNet's gradient checkpointing off for the duration of one forward.

    A checkpointed block recomputes its forward during backward, after functional_call has
    put the real parameters back, and that recompute would hand gradients to the trainable
    K/V. Cost: this member keeps the teacher encoder's activations until backward.
    """
    switched = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True


class TeacherFeatureDiscriminator(nn.Module):
    """Heads on the pooled outputs of every down block and of the mid block of a frozen UNet.

    ``forward`` returns logits of shape (B, levels, 2), levels = len(down_blocks) + 1 (5 for SD:
    4 down blocks + mid). :class:`~echodistill.training.discriminators.ensemble.DiscriminatorEnsemble`
    averages them over levels into one (B, 2) entry; callers wanting per-level losses can use
    this module directly.
    """

    inputs = "latents"

    def __init__(self, unet: nn.Module, hidden_dim: int = 512):
        super().__init__()
        config = unet.config
        unsupported = {
            "class_embed_type": config.class_embed_type,
            # SDXL's "text_time" (pooled text + size ids) is added to the time embedding as the UNet does.
            "addition_embed_type": None if config.addition_embed_type == "text_time" else config.addition_embed_type,
            "encoder_hid_dim_type": getattr(config, "encoder_hid_dim_type", None),
            "time_embedding_act_fn": getattr(config, "time_embedding_act_fn", None),
        }
        unsupported = {k: v for k, v in unsupported.items() if v is not None}
        if unsupported or getattr(config, "center_input_sample", False) or unet.mid_block is None:
            raise BackboneError(
                f"the teacher-feature discriminator supports Stable Diffusion 1.x/2.x and SDXL UNets only; "
                f"this UNet sets {unsupported or 'center_input_sample/no mid block'}. Use the image "
                f"backbones (dino_vits16, dinov2_vitl14, clip_vit_h14) instead"
            )
        object.__setattr__(self, "_unet", unet)  # by reference: not a submodule, never saved
        channels = list(config.block_out_channels) + [config.block_out_channels[-1]]
        self.hidden_dim = hidden_dim
        self.heads = nn.ModuleList(DiscriminatorHead(c, hidden_dim) for c in channels)

    @property
    def unet(self) -> nn.Module:
        return self._unet

    @property
    def num_levels(self) -> int:
        return len(self.heads)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def features(self, latents: torch.Tensor, timesteps: torch.Tensor | float | int,
                 encoder_hidden_states: Conditioning | torch.Tensor) -> list[torch.Tensor]:
        """Pooled encoder features, one (B, C_level) float32 tensor per level.

        `encoder_hidden_states`: a `Conditioning` (SDXL's added text_embeds / time_ids included, which
        join the time embedding as in `UNet2DConditionModel.get_aug_embed`) or prompt states (B, L, D).
        """
        unet = self._unet
        dtype = unet.dtype
        sample = latents.to(dtype)  # (B, 4, h, w)
        cond = as_conditioning(encoder_hidden_states).to(dtype)
        encoder_hidden_states = cond.encoder_hidden_states  # (B, L, D_cross)
        if (unet.config.addition_embed_type == "text_time") != (cond.text_embeds is not None):
            raise BackboneError("an SDXL teacher's features need SDXL conditioning (text_embeds and time_ids), "
                                "and only an SDXL teacher takes them: encode prompts with pair.conditioner")
        with _no_gradient_checkpointing(unet):
            t_emb = unet.get_time_embed(sample=sample, timestep=timesteps)  # (B, C0), no parameters
            emb = _frozen_call(unet.time_embedding, t_emb)  # (B, 4·C0)
            if cond.text_embeds is not None:
                time_embeds = unet.add_time_proj(cond.time_ids.flatten()).reshape(len(cond), -1)  # (B, 6·E), no params
                added = torch.cat([cond.text_embeds, time_embeds], dim=-1).to(emb.dtype)  # (B, P + 6·E)
                emb = emb + _frozen_call(unet.add_embedding, added)  # (B, 4·C0)
            sample = _frozen_call(unet.conv_in, sample)  # (B, C0, h, w)
            pooled = []
            for block in unet.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    sample, _ = _frozen_call(block, hidden_states=sample, temb=emb,
                                             encoder_hidden_states=encoder_hidden_states)
                else:
                    sample, _ = _frozen_call(block, hidden_states=sample, temb=emb)
                pooled.append(sample.mean(dim=(-2, -1)).float())  # (B, C_level)
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = _frozen_call(unet.mid_block, sample, emb,
                                      encoder_hidden_states=encoder_hidden_states)
            else:
                sample = _frozen_call(unet.mid_block, sample, emb)
            pooled.append(sample.mean(dim=(-2, -1)).float())  # (B, C_last)
        return pooled

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float | int,
                encoder_hidden_states: Conditioning | torch.Tensor) -> torch.Tensor:
        """Noised latents (B, 4, h, w), timesteps (B,) or scalar, a `Conditioning` or prompt embeddings (B, L, D).

        Returns logits (B, levels, 2); column 1 = real.
        """
        pooled = self.features(latents, timesteps, encoder_hidden_states)
        logits = [head(f) for head, f in zip(self.heads, pooled)]  # levels × (B, 2)
        return torch.stack(logits, dim=1)  # (B, levels, 2)
