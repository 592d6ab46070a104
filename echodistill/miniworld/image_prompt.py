"""A zero-training personalizer for the mini world, in the style of IP-Adapter (Ye et al., 2023).

What users pick instead of training a concept: an image encoder turns the reference pictures into
a few extra cross-attention tokens, read by every cross-attention layer of a frozen UNet through
its own K/V projections ("decoupled cross-attention"), next to the prompt's tokens:

    attention(Q, K_text, V_text) + scale · attention(Q, K_image, V_image)

It is trained ONCE, on the procedural subject family (procedural.py, the base-model seed range),
with the plain denoising loss of the frozen teacher: the reference is one view of a subject on a
plain background, the target another view of it in a random captioned context. The named
concepts and the validation seeds are never seen, so scoring it on them measures "minutes of
training vs none" on the same subjects as the trained methods. As IP-Adapter trained on SD 1.5
serves its fine-tunes, the adapter trained on the teacher is applied to the one-step student,
which shares its architecture.

The attention processors are diffusers' own (`IPAdapterAttnProcessor2_0`) and the token
projection diffusers' `ImageProjection`; the image encoder is a small CNN trained with them (no
pretrained image tower exists in this world, and the subject oracle must stay independent).

    adapter = train_image_prompt(pair, ImagePromptSettings(), seed=0, log=print)
    adapter.save(path); adapter = ImagePromptAdapter.load(path)
    images = image_prompt_student(pair, adapter, references, prompts, seeds)   # (N, 3, 64, 64) in [0, 1]

Where the file lives: `adapter_path(oracle_root)`, beside the oracle it was trained with
(`scripts/train_miniworld.py --image-prompt-only` writes it there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import EchoDistillError
from ..models.diffusion import alphas_cumprod_for, encode_prompts
from ..models.schedule import add_noise, denoising_target
from ..models.tensor_files import atomic_save_safetensors, open_safetensors
from ..sampling.samplers import native_resolution, sample_student
from .grammar import COLORS, POSITIONS, SIZES, Scene, sample_scene
from .procedural import BASE_SEEDS, procedural_caption, procedural_subject
from .render import render
from .training import (Log, Meter, make_optimizer, min_snr_loss, restore_loop_state, save_loop_state,
                       structured_noise)

ADAPTER_FILE = "image_prompt_adapter.safetensors"
BUILD_COMMAND = "scripts/train_miniworld.py --image-prompt-only"


def adapter_path(oracle_root: str | os.PathLike) -> Path:
    """Where the adapter trained with the oracle in `oracle_root` lives: <oracle_root>/../image_prompt/ADAPTER_FILE."""
    return Path(oracle_root).parent / "image_prompt" / ADAPTER_FILE


class ImagePromptError(EchoDistillError):
    """The image-prompt adapter's file is missing or does not fit the UNet it is attached to."""


@dataclass(frozen=True)
class ImagePromptSettings:
    pairs: int = 16000  # (reference view, target view) pairs of procedural subjects, rendered once
    steps: int = 3000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 100
    tokens: int = 4  # IP-Adapter's number of image tokens
    drop_image: float = 0.05  # IP-Adapter's dropout of either condition, so both can guide alone
    drop_text: float = 0.05
    drop_both: float = 0.05
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.35  # the base teacher's training noise (training.structured_noise)
    coarse_noise: float = 0.35
    checkpoint_every: int = 200  # steps between loop checkpoints when training with a resume path


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ImageEncoder(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, features): max + mean pooled, so place and size drop out."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, width, 2), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
            _conv(2 * width, 3 * width, 2), _conv(3 * width, 3 * width, 1),
        )  # (B, 3w, 8, 8)
        self.out_features = 6 * width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.features(pixels)
        return torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))], dim=1)  # (B, 6w)


def cross_attention_layers(unet) -> dict[str, nn.Module]:
    """{processor name: Attention module} of every cross-attention (attn2) layer of a diffusers UNet."""
    return {name: unet.get_submodule(name.removesuffix(".processor"))
            for name in unet.attn_processors if name.endswith("attn2.processor")}


class ImagePromptAdapter(nn.Module):
    """Image encoder + token projection + one IP-Adapter K/V pair per cross-attention layer of `unet`."""

    def __init__(self, layer_shapes: dict[str, tuple[int, int]], cross_attention_dim: int, tokens: int = 4,
                 width: int = 48) -> None:
        super().__init__()
        self.config = {"layer_shapes": layer_shapes, "cross_attention_dim": cross_attention_dim, "tokens": tokens,
                       "width": width}
        self.encoder = ImageEncoder(width)
        self.projection = ImageProjection(self.encoder.out_features, cross_attention_dim, tokens)
        # ModuleDict keys cannot hold dots: processor names are stored with "/" instead.
        self.processors = nn.ModuleDict({
            name.replace(".", "/"): IPAdapterAttnProcessor2_0(hidden, cross_attention_dim, num_tokens=(tokens,))
            for name, (hidden, _) in layer_shapes.items()
        })

    @classmethod
    def for_unet(cls, unet, tokens: int = 4, width: int = 48) -> "ImagePromptAdapter":
        """A fresh adapter for `unet`, its image K/V initialised from the text K/V (as IP-Adapter does)."""
        layers = cross_attention_layers(unet)
        adapter = cls({name: (m.to_k.out_features, m.to_k.in_features) for name, m in layers.items()},
                      unet.config.cross_attention_dim, tokens, width)
        with torch.no_grad():
            for name, module in layers.items():
                processor = adapter.processors[name.replace(".", "/")]
                processor.to_k_ip[0].weight.copy_(module.to_k.weight)
                processor.to_v_ip[0].weight.copy_(module.to_v.weight)
        return adapter

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, tokens, cross_attention_dim)."""
        return self.projection(self.encoder(pixels))

    def subject_tokens(self, references: torch.Tensor) -> torch.Tensor:
        """Several references of one subject -> (1, tokens, D): their image features averaged first."""
        return self.projection(self.encoder(references).mean(dim=0, keepdim=True))

    @contextlib.contextmanager
    def attached(self, unet, scale: float = 1.0, image_tokens: torch.Tensor | None = None) -> Iterator[None]:
        """Route `unet`'s cross-attention through the adapter; its own processors come back afterwards.

        Without `image_tokens`, call the UNet inside with `encoder_hidden_states=(text_states,
        [image_tokens])` (training). With `image_tokens` (1 or B, tokens, D), every cross-attention
        layer reads those tokens itself and the UNet takes the text states alone, as the library's
        samplers call it; the processors then run in copies cast to the UNet's dtype, so a half-
        precision pair works and the adapter is left as it was.
        Raises ImagePromptError when the UNet's cross-attention layers differ from the adapter's.
        """
        layers = cross_attention_layers(unet)
        expected = {name: tuple(shape) for name, shape in self.config["layer_shapes"].items()}
        found = {name: (m.to_k.out_features, m.to_k.in_features) for name, m in layers.items()}
        if found != expected:
            raise ImagePromptError("this image-prompt adapter was trained for a UNet with other cross-attention "
                                   f"layers; retrain it for this model ({BUILD_COMMAND})")
        original = unet.attn_processors
        processors = dict(original)  # self-attention keeps its own processors
        for name in layers:
            processor = self.processors[name.replace(".", "/")]
            if image_tokens is not None and next(processor.parameters()).dtype != unet.dtype:
                processor = copy.deepcopy(processor).to(unet.dtype)
            processor.scale = [scale]
            processors[name] = (processor if image_tokens is None
                                else _FixedImageTokens(processor, image_tokens.to(unet.device, unet.dtype)))
        unet.set_attn_processor(processors)
        try:
            yield
        finally:
            unet.set_attn_processor(original)

    def save(self, path: str | os.PathLike) -> Path:
        """fp16 weights + constructor arguments in one safetensors file, written atomically."""
        path = Path(path)
        state = {k: v.detach().half().contiguous() for k, v in self.state_dict().items()}
        metadata = {"class": type(self).__name__, "config": json.dumps(self.config)}
        return atomic_save_safetensors(state, path, metadata)  # with the mode a plain open() gives

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImagePromptAdapter":
        path = Path(path)
        if not path.is_file():
            raise ImagePromptError(f"image-prompt adapter not found: {path}; build it with {BUILD_COMMAND}")
        with open_safetensors(path, ImagePromptError, f"rebuild it with {BUILD_COMMAND}") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("class") != cls.__name__:
            raise ImagePromptError(f"{path} is not an image-prompt adapter (class {metadata.get('class')!r})")
        try:
            config = json.loads(metadata["config"])
            config["layer_shapes"] = {k: tuple(v) for k, v in config["layer_shapes"].items()}
            adapter = cls(**config)
            adapter.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, SafetensorError) as error:
            raise ImagePromptError(f"{path} does not hold an adapter this version can read ({error}); rebuild it "
                                   f"with {BUILD_COMMAND}") from None
        return adapter.eval().requires_grad_(False)


class _FixedImageTokens:
    """An IP-Adapter processor given its image tokens once: the UNet is then called with the text states alone."""

    def __init__(self, processor: IPAdapterAttnProcessor2_0, image_tokens: torch.Tensor) -> None:
        self.processor, self.image_tokens = processor, image_tokens  # (1 or B, tokens, D)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        tokens = self.image_tokens.expand(hidden_states.shape[0], -1, -1)  # (B, tokens, D)
        return self.processor(attn, hidden_states, (encoder_hidden_states, [tokens]), attention_mask, temb)


# --- training -------------------------------------------------------------------------------

def _signed(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float32 (B, 3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_pairs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`count` (reference view, target view, target caption) triples of base-range procedural subjects.

    The reference stands on a plain background, as users' reference photos do; the target is the
    same subject in a random context, captioned as the base models were trained.
    """
    references, targets, captions = [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed, index, 4242])
        subject = procedural_subject(int(rng.integers(BASE_SEEDS.start, BASE_SEEDS.stop)))
        backgrounds = [c for c in COLORS if c not in subject.clashes]
        reference = Scene(subject.name, None, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)),
                          str(rng.choice(backgrounds)), "plain")
        scene = sample_scene(rng, subject.name)
        if scene.bg_color in subject.clashes:
            scene = Scene(scene.subject, None, scene.size, scene.position, str(rng.choice(backgrounds)),
                          scene.bg_pattern)
        scene, caption = procedural_caption(scene, subject, rng)
        references.append(render(reference, rng))
        targets.append(render(scene, rng))
        captions.append(caption.text)
    return np.stack(references), np.stack(targets), captions


def train_image_prompt(unet, vae, tokenizer, text_encoder, scheduler_config: dict, settings: ImagePromptSettings,
                       seed: int, log: Log, resume_path: Path | None = None) -> ImagePromptAdapter:
    """Train the adapter on the frozen `unet` (the teacher) with the ε-prediction denoising loss.

    With `resume_path`, the loop state is saved there every `settings.checkpoint_every` steps and
    picked up from it when it exists (training.save_loop_state), so a cut run ends as an uncut one.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 6)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    adapter = ImagePromptAdapter.for_unet(unet, settings.tokens).train()
    reference_images, target_images, captions = render_pairs(settings.pairs, seed)
    log(f"image prompt: {settings.pairs} view pairs rendered")
    with torch.no_grad():
        latents = torch.cat([vae.encode(_signed(target_images[i : i + 256])).latent_dist.mean
                             for i in range(0, len(target_images), 256)]) * vae.config.scaling_factor
        text = torch.cat([encode_prompts(tokenizer, text_encoder, captions[i : i + 512])
                          for i in range(0, len(captions), 512)])  # (N, 77, D)
        empty = encode_prompts(tokenizer, text_encoder, [""])  # (1, 77, D)
    alphas_cumprod = alphas_cumprod_for(scheduler_config)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    optimizer, scheduler = make_optimizer([{"params": list(adapter.parameters()), "lr": settings.lr,
                                            "weight_decay": 1e-2}], settings.steps, settings.warmup)
    modules = {"adapter": adapter}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, "image prompt",
                               settings.steps)
    meter = Meter()
    with adapter.attached(unet):
        for step in range(first, settings.steps + 1):
            index = torch.randint(0, len(latents), (settings.batch,), generator=generator)
            clean = latents[index]  # (B, 4, 16, 16)
            states = text[index].clone()  # (B, 77, D)
            tokens = adapter.image_tokens(_signed(reference_images[index.numpy()]))  # (B, tokens, D)
            # One draw per sample: text dropped, image dropped, both dropped (IP-Adapter's 5% each), or neither.
            draw = torch.rand(settings.batch, generator=generator)
            both = settings.drop_text + settings.drop_image
            no_text = (draw < settings.drop_text) | ((draw >= both) & (draw < both + settings.drop_both))
            no_image = draw >= settings.drop_text
            no_image &= draw < both + settings.drop_both
            states[no_text] = empty
            tokens = tokens * (~no_image).float().view(-1, 1, 1)  # a zero image: IP-Adapter's unconditional
            noise = structured_noise(clean.shape, generator, settings.offset_noise, settings.coarse_noise)
            timesteps = torch.randint(0, len(alphas_cumprod), (settings.batch,), generator=generator)
            prediction = unet(add_noise(clean, noise, timesteps, alphas_cumprod), timesteps,
                              encoder_hidden_states=(states, [tokens])).sample
            target = denoising_target(clean, noise, timesteps, alphas_cumprod, prediction_type)
            loss, _ = min_snr_loss(prediction, target, timesteps, snr, settings.min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            meter.add(loss=loss.item())
            if step % 50 == 0 or step == settings.steps:
                log(f"image prompt {meter.line(step, settings.steps)}")
            if resume_path is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
                save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    log(f"image prompt settings: {json.dumps(asdict(settings))}")
    return adapter.eval().requires_grad_(False)


# --- sampling ---------------------------------------------------------------------------------

@torch.no_grad()
def image_prompt_student(pair, adapter: ImagePromptAdapter, references: torch.Tensor, prompts: Sequence[str],
                         seeds: Sequence[int], scale: float = 1.0, *, width: int | None = None,
                         height: int | None = None) -> torch.Tensor:
    """The one-step student with the adapter: (N, 3, height, width) float32 in [0, 1] on the CPU, one per prompt.

    `references` (R, 3, H, W) in [0, 1] are one subject's pictures (their features averaged).
    The pictures come from `sampling.sample_student` itself, with the adapter's processors in the
    student's cross-attention: the same noise per seed, t = 999 (ComfyUI's convention), prompt
    encoding, precision and decoding as every other student row, so with `scale` 0 this is
    `sample_student` exactly. `width`/`height` in pixels default to the student's native size.
    The adapter moves to the pair's device. Raises ImagePromptError when the adapter was trained
    for another UNet, SamplingError for a size or seeds the sampler refuses.
    """
    unet = pair.student.unet
    side = native_resolution(pair, "student")
    adapter.to(pair.device)
    tokens = adapter.subject_tokens(references.to(pair.device, torch.float32) * 2 - 1)  # (1, tokens, D)
    with adapter.attached(unet, scale, image_tokens=tokens):
        return sample_student(pair, list(prompts), seeds=[int(s) for s in seeds], width=width or side,
                              height=height or side, return_latents=False).images  # (N, 3, H, W)
