"""DreamBench-style evaluation metrics: CLIP-T, CLIP-I and DINO, from local weights only.

Protocol (DESIGN section 1, "Evaluation protocol"):
  * CLIP-T: cosine between each generated image and its own prompt, with the concept token
    rewritten by :func:`clip_t_prompt` (the identifier is replaced by the class word), CLIP
    ViT-L/14@336 in the paper.
  * CLIP-I: mean cosine over all (generated, reference) pairs of CLIP image embeddings.
  * DINO: the same over DINOv2 ViT-L/14 (paper) or DINO ViT-S/16 CLS embeddings.
Every cosine is clipped at 0 *per pair* before averaging: max(0, cos), as CLIP-score does.

Images go in as float tensors in [0, 1], (N, 3, H, W) or a list of (3, H, W) of any sizes.
Preprocessing is done in torch (bicubic, antialias), so it matches the transformers image
processors (PIL bicubic on uint8) to within resampling round-off, not bit for bit:
  * CLIP: shorter side resized to the model's ``image_size`` (336 for ViT-L/14@336), center
    crop to a square of that side, CLIP mean/std.
  * DINO / DINOv2: shorter side resized to 256, center crop 224, ImageNet mean/std (the DINO
    evaluation transform and the DINOv2 image processor's defaults; DINOv2 interpolates its
    518-px position grid to 224).
"""

from __future__ import annotations

import abc
import json
import os
import re
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from ..errors import EchoDistillError
from ..models.backbones import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, load_backbone
from ..models.tensor_files import open_safetensors
from ..models.tokenizer import load_clip_tokenizer


class MetricsError(EchoDistillError):
    """An evaluation metric cannot be computed: missing weights, bad images or prompts."""


MetricName = Literal["clip_t", "clip_i", "dino"]
ImageBatch = torch.Tensor | Sequence[torch.Tensor]

CLIP_HINT = ("a CLIP ViT-L/14-336 folder (transformers format: config.json + model.safetensors, "
             "tokenizer files optional), e.g. openai/clip-vit-large-patch14-336")
DINO_HINT = ("a DINOv2 ViT-L/14 folder (transformers format: config.json + model.safetensors, "
             "e.g. facebook/dinov2-large) or a DINO ViT-S/16 one (facebook/dino-vits16), "
             "or that folder's model.safetensors alone")

# metric name -> (backbone it needs, evaluate() argument that gives it, what to put there).
METRICS: dict[str, tuple[str, str, str]] = {
    "clip_t": ("CLIP", "clip_path", CLIP_HINT),
    "clip_i": ("CLIP", "clip_path", CLIP_HINT),
    "dino": ("DINO", "dino_path", DINO_HINT),
}

DINO_RESIZE = 256  # shorter side before the crop, as in the DINO / DINOv2 evaluation transform
DINO_CROP = 224
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_DINO_NAMES = {"dinov2": "dinov2_vitl14", "vit": "dino_vits16"}  # model_type -> backbone registry key


def preprocess_images(images: ImageBatch, *, resize: int, crop: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] images -> (N, 3, crop, crop) normalized float32 pixels.

    Each image: shorter side bicubic-resized (antialias) to ``resize``, longer side to
    ``int(resize * long / short)`` as torchvision and transformers do, values clamped back to
    [0, 1] (bicubic overshoots; PIL's uint8 output clamps too), center crop with the top-left
    corner at ``(size - crop) // 2``, then ``(x - mean) / std``.
    """
    items = _as_image_list(images)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for x in items:  # each (1, 3, H, W); one at a time because sizes may differ
        x = x.float()
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        size_long = int(resize * long / short)
        size = (resize, size_long) if h <= w else (size_long, resize)
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        if min(size) < crop:
            raise MetricsError(f"resize side {resize} is smaller than the crop {crop}")
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        x = x[..., top:top + crop, left:left + crop]  # (1, 3, crop, crop)
        out.append((x - mean_t.to(x.device)) / std_t.to(x.device))
    return torch.cat(out)  # (N, 3, crop, crop)


def _as_image_list(images: ImageBatch) -> list[torch.Tensor]:
    """Validate and split images into (1, 3, H, W) tensors; refuses [-1, 1] or [0, 255] input."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise MetricsError(f"images must be (N, 3, H, W) floats in [0, 1], got shape {tuple(images.shape)}")
        items = list(images.split(1))
    else:
        items = []
        for i, x in enumerate(images):
            if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[-3] != 3 \
                    or (x.ndim == 4 and x.shape[0] != 1):
                raise MetricsError(f"image {i} must be a (3, H, W) float tensor in [0, 1], "
                                   f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
            items.append(x.reshape(1, *x.shape[-3:]))
    if not items:
        raise MetricsError("no images given: every metric needs at least one image on each side")
    for i, x in enumerate(items):
        if not x.is_floating_point():
            raise MetricsError(f"image {i} has dtype {x.dtype}; convert to float in [0, 1] (x / 255)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise MetricsError(f"image {i} has values in [{lo:.3g}, {hi:.3g}]; metrics take [0, 1] "
                               f"pixels (from [-1, 1] use (x + 1) / 2)")
    return items


class _ImageScorer(abc.ABC):
    """A frozen vision model behind a fixed preprocessing; subclasses say how to read features."""

    def __init__(self, *, resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                 batch_size: int):
        if batch_size < 1:
            raise MetricsError(f"batch_size must be at least 1, got {batch_size}")
        self.resize, self.crop = resize, crop
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size = batch_size

    @abc.abstractmethod
    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, 3, crop, crop) normalized pixels -> (b, D) features."""

    @property
    @abc.abstractmethod
    def _param(self) -> torch.Tensor:
        """Any parameter of the model: where (device, dtype) its inputs must go."""

    @torch.no_grad()
    def image_embeddings(self, images: ImageBatch) -> torch.Tensor:
        """[0, 1] images (N, 3, H, W) or a list of (3, H, W) -> L2-normalized (N, D) float32."""
        pixels = preprocess_images(images, resize=self.resize, crop=self.crop, mean=self.mean, std=self.std)
        param = self._param
        chunks = [self._features(chunk.to(device=param.device, dtype=param.dtype)).float()
                  for chunk in pixels.split(self.batch_size)]  # each (b, D)
        return F.normalize(torch.cat(chunks), dim=-1)  # (N, D)


class ClipScorer(_ImageScorer):
    """A full transformers ``CLIPModel`` (text + vision towers) with its tokenizer."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, *, batch_size: int = 32):
        side = model.config.vision_config.image_size
        side = int(side if isinstance(side, int) else side[0])
        super().__init__(resize=side, crop=side, mean=CLIP_MEAN, std=CLIP_STD, batch_size=batch_size)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @property
    def _param(self) -> torch.Tensor:
        return self.model.visual_projection.weight

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The towers' pooler_output + projection: get_image_features returns a tensor in
        # transformers 4.x but a ModelOutput in 5.x; this path is the same in both.
        pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output  # (b, hidden)
        return self.model.visual_projection(pooled)  # (b, D)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalized (N, D) float32; truncated to 77 tokens, padded with the end token."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise MetricsError("no prompts given to the CLIP text encoder")
        device = self._param.device
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length",
                                    truncation=True, max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens.input_ids.to(device),
                                           attention_mask=tokens.attention_mask.to(device)).pooler_output
            chunks.append(self.model.text_projection(pooled).float())  # (b, D)
        return F.normalize(torch.cat(chunks), dim=-1)  # (N, D)


class DinoScorer(_ImageScorer):
    """A DINOv2 (``Dinov2Model``) or DINO (``ViTModel``) backbone read at its CLS token."""

    def __init__(self, model: nn.Module, *, batch_size: int = 32):
        super().__init__(resize=DINO_RESIZE, crop=DINO_CROP, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         batch_size=batch_size)
        self.model = model.eval().requires_grad_(False)
        side = model.config.image_size
        side = int(side if isinstance(side, int) else side[0])
        # ViTModel only takes its configured size unless told to interpolate its position grid;
        # DINO ViT-S/16 is configured for 224, so this is off for the real model.
        self._interpolate = model.config.model_type == "vit" and side != DINO_CROP

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        hidden = self.model(pixel_values=pixel_values, **extra).last_hidden_state  # (b, 1+T, hidden)
        return hidden[:, 0]  # CLS token after the final layernorm


def load_clip_metric_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, batch_size: int = 32) -> ClipScorer:
    """Load a full CLIP model (text + vision) from a local transformers folder, never downloading.

    The folder's own ``vocab.json`` + ``merges.txt`` are used when present, else the shipped CLIP
    vocabulary (identical BPE). Either way padding is with ``<|endoftext|>`` as in OpenAI CLIP.
    """
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise MetricsError(f"CLIP metric model path {folder} {what}; CLIP-T/CLIP-I need {CLIP_HINT}")
    _check_folder(folder, "CLIP", CLIP_HINT)
    model_type = _model_type(folder)
    if model_type != "clip":
        extra = (" (an image-only CLIP; CLIP-T needs the text tower too)"
                 if model_type == "clip_vision_model" else "")
        raise MetricsError(f"{folder} holds a {model_type!r} model{extra}, not a full CLIP model; "
                           f"CLIP-T/CLIP-I need {CLIP_HINT}")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise MetricsError(f"could not load CLIP from {folder}: {err}; CLIP-T/CLIP-I need {CLIP_HINT}") from err
    has_vocab = all((folder / name).is_file() for name in ("vocab.json", "merges.txt"))
    tokenizer = load_clip_tokenizer("sd1", folder=folder if has_vocab else None)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise MetricsError(f"the tokenizer has {len(tokenizer)} tokens but the CLIP text model in {folder} "
                           f"only {model.config.text_config.vocab_size}; use {CLIP_HINT}")
    return ClipScorer(model.to(device=device, dtype=dtype), tokenizer, batch_size=batch_size)


def load_dino_metric_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, batch_size: int = 32) -> DinoScorer:
    """Load DINOv2 (``model_type`` "dinov2") or DINO ViT (``"vit"``) from a local folder or file.

    Loading goes through the discriminator backbones' loader (same offline checks, same
    single-file support); only the model is kept, the metric does its own preprocessing.
    """
    source = Path(path)
    if not source.exists():
        raise MetricsError(f"DINO metric model not found at {source}; DINO needs {DINO_HINT}")
    if source.is_dir():
        _check_folder(source, "DINO", DINO_HINT)
        model_type = _model_type(source)
    elif source.suffix == ".safetensors":
        with open_safetensors(source, MetricsError, f"DINO needs {DINO_HINT}") as f:  # DINOv2 has layer scales
            model_type = "dinov2" if any("layer_scale" in k for k in f.keys()) else "vit"
    else:
        raise MetricsError(f"{source} is neither a folder nor a .safetensors file; DINO needs {DINO_HINT}")
    if model_type not in _DINO_NAMES:
        raise MetricsError(f"{source} holds a {model_type!r} model, not DINOv2 or DINO ViT "
                           f"(model_type 'dinov2' or 'vit'); DINO needs {DINO_HINT}")
    backbone = load_backbone(_DINO_NAMES[model_type], source, dtype=dtype, device=device)
    return DinoScorer(backbone.model, batch_size=batch_size)


def _check_folder(folder: Path, what: str, hint: str) -> None:
    if not (folder / "config.json").is_file():
        raise MetricsError(f"{folder} has no config.json; {what} needs {hint}")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise MetricsError(f"{folder} has config.json but no model.safetensors; {what} needs {hint}")


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as err:
        raise MetricsError(f"cannot read {folder / 'config.json'}: {err}") from err


def clip_t_prompt(prompt: str, token: str | None, class_word: str | None = None) -> str:
    """The prompt CLIP-T scores: the concept token replaced by the class word, never doubled.

    With ``class_word``: "``<token> <class_word>``" becomes "``<class_word>``" (the usual
    template, "a photo of a <v*> dog" -> "a photo of a dog"), and any other occurrence of the
    token becomes the class word ("<v*> on the beach" -> "dog on the beach"). Without it the
    token is deleted ("a photo of <v*> dog" -> "a photo of dog"). The token matches as a whole
    word only ("sks" is not found inside "asks"), case-sensitively; the class word after it
    matches case-insensitively as a whole word. Runs of spaces collapse to one, and a space
    left before punctuation is dropped. ``token=None`` returns the prompt unchanged.
    """
    if not token:
        return prompt
    tok = rf"(?<![\w]){re.escape(token)}(?![\w])"
    if class_word:
        text = re.sub(tok + rf"\s+(?=(?i:{re.escape(class_word)})(?![\w]))", "", prompt)
        text = re.sub(tok, lambda _m: class_word, text)
    else:
        text = re.sub(tok, "", prompt)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def clip_t(scorer: ClipScorer, images: ImageBatch, prompts: Sequence[str] | str,
           class_word: str | None = None, token: str | None = None) -> float:
    """Mean over images of max(0, cos(image_i, prompt_i)), prompts rewritten by :func:`clip_t_prompt`.

    ``prompts`` gives one prompt per image (in order), or one string for all images.
    """
    prompts = _prompt_list(prompts, _count(images))
    return _clip_t_from_embeddings(scorer, scorer.image_embeddings(images), prompts, token, class_word)


def mean_clipped_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of max(0, cos) over all pairs of rows of two L2-normalized (N, D) and (M, D) sets."""
    return float((a @ b.T).clamp_min(0).mean())  # (N, M) -> scalar


def clip_i(scorer: ClipScorer, generated: ImageBatch, references: ImageBatch) -> float:
    """Mean over all (generated, reference) pairs of max(0, cos) of CLIP image embeddings."""
    return mean_clipped_cosine(scorer.image_embeddings(generated), scorer.image_embeddings(references))


def dino(scorer: DinoScorer, generated: ImageBatch, references: ImageBatch) -> float:
    """Mean over all (generated, reference) pairs of max(0, cos) of DINO CLS embeddings."""
    return mean_clipped_cosine(scorer.image_embeddings(generated), scorer.image_embeddings(references))


def evaluate(generated: ImageBatch, references: ImageBatch, prompts: Sequence[str] | str | None, *,
             token: str | None, class_word: str | None,
             clip_path: str | os.PathLike | None = None, dino_path: str | os.PathLike | None = None,
             metrics: Sequence[MetricName] | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 32) -> dict[str, float]:
    """Score generated images against the concept's reference photos.

    ``metrics=None`` computes every metric whose backbone path is given (CLIP -> clip_t and
    clip_i, DINO -> dino). Naming a metric whose path is missing raises :class:`MetricsError`
    saying which file it needs and which argument takes it. ``prompts`` (one per generated
    image, or one for all) is needed for clip_t. Each backbone is loaded once.
    """
    paths = {"clip_path": clip_path, "dino_path": dino_path}
    if metrics is None:
        wanted = [name for name, (_, arg, _) in METRICS.items() if paths[arg] is not None]
        if not wanted:
            raise MetricsError(f"nothing to evaluate: pass clip_path= ({CLIP_HINT}) for CLIP-T/CLIP-I "
                               f"and/or dino_path= ({DINO_HINT}) for DINO", parameters=("clip_path", "dino_path"))
    else:
        wanted = list(dict.fromkeys(metrics))
        unknown = [m for m in wanted if m not in METRICS]
        if unknown:
            raise MetricsError(f"unknown metric(s) {unknown}; valid metrics: {', '.join(METRICS)}")
        for name in wanted:
            _, arg, hint = METRICS[name]
            if paths[arg] is None:
                raise MetricsError(f"{name.upper().replace('_', '-')} needs {hint}; pass {arg}=...", parameters=(arg,))
    if "clip_t" in wanted:  # checked before any model loads
        if prompts is None:
            raise MetricsError("CLIP-T needs the prompts the images were generated from; pass prompts=...",
                               parameters=("prompts",))
        prompts = _prompt_list(prompts, _count(generated))

    kw = dict(device=device, dtype=dtype, batch_size=batch_size)
    results: dict[str, float] = {}
    if "clip_t" in wanted or "clip_i" in wanted:
        scorer = load_clip_metric_model(clip_path, **kw)
        gen_emb = scorer.image_embeddings(generated)  # (N, D), shared by both CLIP metrics
        if "clip_t" in wanted:
            results["clip_t"] = _clip_t_from_embeddings(scorer, gen_emb, prompts, token, class_word)
        if "clip_i" in wanted:
            results["clip_i"] = mean_clipped_cosine(gen_emb, scorer.image_embeddings(references))
        del scorer
    if "dino" in wanted:
        results["dino"] = dino(load_dino_metric_model(dino_path, **kw), generated, references)
    return {name: results[name] for name in METRICS if name in results}


def _count(images: ImageBatch) -> int:
    return 1 if isinstance(images, torch.Tensor) and images.ndim == 3 else len(images)


def _prompt_list(prompts: Sequence[str] | str, n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * n
    if len(prompts) != n:
        raise MetricsError(f"CLIP-T needs one prompt per generated image: got {len(prompts)} prompts "
                           f"for {n} images")
    return list(prompts)


def _clip_t_from_embeddings(scorer: ClipScorer, image_emb: torch.Tensor, prompts: list[str],
                            token: str | None, class_word: str | None) -> float:
    text_emb = scorer.text_embeddings([clip_t_prompt(p, token, class_word) for p in prompts])  # (N, D)
    return float((image_emb * text_emb).sum(-1).clamp_min(0).mean())  # max(0, cos) per image
