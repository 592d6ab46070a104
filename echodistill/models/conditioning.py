"""What a UNet reads besides latents and timesteps, and how a pair's text encoders make it from prompts.

    conditioner = pair.conditioner                        # one per pair, for every family
    cond = conditioner.encode(prompts, size=(512, 512))   # Conditioning, batch B
    unet(latents, t, **cond.unet_kwargs(unet.dtype))       # what `diffusion.unet_call` does

SD 1.x / 2.x: `encoder_hidden_states` is the single text encoder's last hidden state (B, 77, D) and
nothing else. SDXL (Podell et al. 2023, §2.1 and §2.2; diffusers' `StableDiffusionXLPipeline.encode_prompt`
and `_get_add_time_ids`): the penultimate hidden states (`hidden_states[-2]`) of CLIP ViT-L (768) and
OpenCLIP ViT-bigG (1280), concatenated to (B, 77, 2048); plus the UNet's added conditioning
`text_embeds`, the bigG tower's pooled projection (B, 1280), and `time_ids`, (original height, original
width, crop top, crop left, target height, target width) in pixels (B, 6). We use no crop and
original = target = the image size, as diffusers' pipeline does by default.

Samplers, the trainer and the discriminators handle a `Conditioning` the way they handled a tensor
(slice, concatenate, detach, expand a batch of one), so they have one code path for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from .tokenizer import prompt_chunks, token_ids

Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class Conditioning:
    """A batch of UNet conditioning: the prompt states, and for SDXL the added `text_embeds` / `time_ids`.

    Every field has the same batch size B in dim 0 (`len(cond)`); `text_embeds` and `time_ids` are
    both None (SD 1.x / 2.x) or both set (SDXL).
    """

    encoder_hidden_states: torch.Tensor  # (B, L, D): D = 1024 (SD 2.x), 768 (SD 1.x), 2048 (SDXL)
    text_embeds: torch.Tensor | None = None  # (B, 1280): SDXL's pooled, projected bigG output
    time_ids: torch.Tensor | None = None  # (B, 6): SDXL's size and crop conditioning, in pixels

    def __post_init__(self):
        if (self.text_embeds is None) != (self.time_ids is None):
            raise ConfigError("SDXL conditioning needs both text_embeds and time_ids (or neither, for SD 1.x / 2.x)")

    # --- what the UNet reads --------------------------------------------------------------------
    @property
    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """diffusers' `added_cond_kwargs` for a UNet with `addition_embed_type="text_time"`; None otherwise."""
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward`, every tensor cast to `dtype` (None: kept)."""
        cond = self if dtype is None else self.to(dtype)
        kwargs: dict = {"encoder_hidden_states": cond.encoder_hidden_states}
        if cond.text_embeds is not None:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
        return kwargs

    # --- tensor-like handling -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The prompt states' shape (B, L, D)."""
        return self.encoder_hidden_states.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_hidden_states.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder_hidden_states.device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        """The same conditioning with `fn` applied to every tensor (each keeps its batch dimension first)."""
        extra = None if self.text_embeds is None else (fn(self.text_embeds), fn(self.time_ids))
        return Conditioning(fn(self.encoder_hidden_states), *(extra or (None, None)))

    def __getitem__(self, index) -> "Conditioning":
        """Rows of the batch: `cond[:2]`, `cond[tensor_of_indices]`."""
        return self.map(lambda t: t[index])

    def detach(self) -> "Conditioning":
        return self.map(torch.Tensor.detach)

    def float(self) -> "Conditioning":
        return self.map(torch.Tensor.float)

    def to(self, *args, **kwargs) -> "Conditioning":
        """As `Tensor.to` for every tensor (a dtype casts floating tensors only)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def expand(self, batch: int) -> "Conditioning":
        """A batch of one repeated `batch` times, without copying (e.g. the unconditional prompt)."""
        if len(self) not in (1, batch):
            raise ConfigError(f"cannot expand a conditioning of batch {len(self)} to {batch}")
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    def expand_as(self, other: "Conditioning | torch.Tensor") -> "Conditioning":
        return self.expand(len(other))

    @staticmethod
    def cat(items: Sequence["Conditioning | torch.Tensor"]) -> "Conditioning":
        """Concatenate along the batch; every item of one kind (all SDXL or none)."""
        items = [as_conditioning(item) for item in items]
        if len({item.text_embeds is None for item in items}) > 1:
            raise ConfigError("cannot batch SDXL conditioning with SD 1.x / 2.x conditioning")
        states = torch.cat([item.encoder_hidden_states for item in items])
        if items[0].text_embeds is None:
            return Conditioning(states)
        return Conditioning(states, torch.cat([i.text_embeds for i in items]), torch.cat([i.time_ids for i in items]))


def as_conditioning(cond: "Conditioning | torch.Tensor") -> Conditioning:
    """A `Conditioning` from either one or a bare prompt-state tensor (B, L, D) (SD 1.x / 2.x callers)."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def size_time_ids(size: Size, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """SDXL's `time_ids` (batch, 6) float32: (original h, w, crop top, crop left, target h, w) for an
    uncropped `size` = (height, width) image, as diffusers' `StableDiffusionXLPipeline._get_add_time_ids`
    builds them by default (original_size = target_size = (height, width), crops_coords_top_left = (0, 0))."""
    height, width = size
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
    return ids.expand(batch, -1)


class PromptConditioner:
    """A pair's tokenizers and text encoders, turning prompts into `Conditioning`.

    One tokenizer and encoder (SD 1.x / 2.x) or two (SDXL: CLIP ViT-L, then OpenCLIP ViT-bigG with
    its projection). Holds references only: the encoders are the pair's own objects, never copies.

    Args:
        tokenizers, text_encoders: as many of each, in the UNet's concatenation order.
        added_conditioning: the UNets take SDXL's `text_embeds` / `time_ids` (their config's
            `addition_embed_type == "text_time"`).
        zeros_for_empty_prompt: an empty negative prompt is all-zero conditioning rather than the
            encoded "" (SDXL's published `force_zeros_for_empty_prompt`).
    """

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence, *, added_conditioning: bool = False,
                 zeros_for_empty_prompt: bool = False):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ConfigError(
                f"{len(tokenizers)} tokenizers for {len(text_encoders)} text encoders: give one per encoder")
        if added_conditioning and len(text_encoders) != 2:
            raise ConfigError("SDXL conditioning needs two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG)")
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)
        self.added_conditioning = added_conditioning
        self.zeros_for_empty_prompt = zeros_for_empty_prompt

    @property
    def device(self) -> torch.device:
        return self.text_encoders[0].device

    def _states(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt states (B, L, D), pooled (B, P) or None) from each encoder's token ids (B, L)."""
        if not self.added_conditioning:
            return self.text_encoders[0](ids[0].to(self.device)).last_hidden_state, None  # (B, L, D)
        states, pooled = [], None
        for encoder, encoder_ids in zip(self.text_encoders, ids):
            output = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])  # (B, L, D_i): penultimate layer, no final norm
            pooled = getattr(output, "text_embeds", None)  # the last encoder's projection
        if pooled is None:
            raise ConfigError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled text_embeds)")
        return torch.cat(states, dim=-1), pooled  # (B, L, 2048), (B, 1280)

    def _with_size(self, states: torch.Tensor, pooled: torch.Tensor | None, size: Size | None) -> Conditioning:
        if not self.added_conditioning:
            return Conditioning(states)
        if size is None:
            raise ConfigError("SDXL conditioning needs the image size (height, width) for its time_ids")
        return Conditioning(states, pooled, size_time_ids(size, states.shape[0], states.device).to(states.dtype))

    def encode(self, prompts: Sequence[str], size: Size | None = None) -> Conditioning:
        """Training's encoder: each prompt cut to 77 tokens (a warning names one that is longer).

        Returns a Conditioning of batch len(prompts): states (B, 77, D) and, for SDXL, text_embeds
        (B, 1280) and time_ids (B, 6) for an image of `size` = (height, width) pixels (required then).
        """
        ids = [token_ids(tokenizer, prompts) for tokenizer in self.tokenizers]  # each (B, 77)
        states, pooled = self._states(ids)
        return self._with_size(states, pooled, size)

    def negative(self, prompt: str, size: Size | None = None) -> Conditioning:
        """The unconditional / negative conditioning (batch 1): all zeros for "" when the family says so."""
        cond = self.encode([prompt], size)
        if prompt == "" and self.zeros_for_empty_prompt:  # zero states and pooled; the size ids stay
            cond = Conditioning(torch.zeros_like(cond.encoder_hidden_states), torch.zeros_like(cond.text_embeds),
                                cond.time_ids)
        return cond

    def encode_long(self, prompts: Sequence[str]) -> list[Conditioning]:
        """Per prompt, a Conditioning of batch 1 without time_ids yet: states (1, 77·k, D) from every 77-token
        window (ComfyUI's CLIPTextEncode windows, `tokenizer.prompt_chunks`) encoded on its own, and for SDXL
        the pooled output of the first window (as ComfyUI takes it). One encoder call per text encoder."""
        if not prompts:
            return []
        windows = [[prompt_chunks(tokenizer, p) for p in prompts] for tokenizer in self.tokenizers]
        counts = [len(w) for w in windows[0]]
        if any([len(w) for w in other] != counts for other in windows[1:]):
            raise ConfigError("the two tokenizers split a prompt into different windows; load matching tokenizers")
        ids = [torch.tensor([window for chunks in per_tokenizer for window in chunks]) for per_tokenizer in windows]
        states, pooled = self._states(ids)  # (W, 77, D), (W, P) or None
        out, first = [], 0
        for count in counts:
            prompt_states = states[first:first + count].reshape(1, -1, states.shape[-1])  # (1, 77·k, D)
            out.append(Conditioning(prompt_states) if pooled is None else
                       Conditioning(prompt_states, pooled[first:first + 1], torch.zeros(1, 6, device=states.device)))
            first += count
        return out

    def sized(self, cond: Conditioning, size: Size | None) -> Conditioning:
        """`cond` with the time_ids of an image of `size` (SDXL); unchanged for SD 1.x / 2.x."""
        if cond.text_embeds is None:
            return cond
        return self._with_size(cond.encoder_hidden_states, cond.text_embeds, size)
