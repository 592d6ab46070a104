"""Evaluation metrics on tiny random CLIP / DINOv2 / DINO ViT models, CPU only.

Reference values are computed here without the module's code paths: the transformers model is
called directly on pixels prepared by hand, and the pairwise means are explicit loops.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTModel,
)

from echodistill.errors import EchoDistillError
from echodistill.evaluation import metrics
from echodistill.evaluation.metrics import (
    MetricsError,
    clip_i,
    clip_t,
    clip_t_prompt,
    dino,
    evaluate,
    load_clip_metric_model,
    load_dino_metric_model,
)
from echodistill.models.tokenizer import ASSET_DIR

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(common, vocab_size=49408),
                        vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    _tiny_clip().save_pretrained(folder)  # no tokenizer files: the shipped vocabulary is used
    return folder


@pytest.fixture(scope="module")
def clip_model(clip_folder):
    return CLIPModel.from_pretrained(str(clip_folder), local_files_only=True).eval()


@pytest.fixture(scope="module")
def clip_scorer(clip_folder):
    return load_clip_metric_model(clip_folder)


@pytest.fixture(scope="module")
def dino_folders(tmp_path_factory):
    torch.manual_seed(1)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    folders = {}
    for kind, model in {
        "dinov2": Dinov2Model(Dinov2Config(**common, mlp_ratio=2, image_size=28, patch_size=14)),
        # image_size 32: the metric's 224 crop needs the ViT position grid interpolated.
        "vit": ViTModel(ViTConfig(**common, intermediate_size=64, image_size=32, patch_size=8),
                        add_pooling_layer=False),
    }.items():
        folders[kind] = tmp_path_factory.mktemp(kind)
        model.eval().save_pretrained(folders[kind])
    return folders


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Low-frequency images in [0.2, 0.8]: bicubic resizing neither overshoots nor clamps."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.6 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)


def _resize_crop(x: torch.Tensor, short: int, crop: int) -> torch.Tensor:
    """Hand-written reference: shorter side to `short` (bicubic, antialias), center crop."""
    h, w = x.shape[-2:]
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return x[:, :, top:top + crop, left:left + crop]


def _clip_image_ref(model: CLIPModel, images: torch.Tensor) -> list[torch.Tensor]:
    pixels = (_resize_crop(images, 32, 32) - CLIP_MEAN) / CLIP_STD
    ids = torch.full((images.shape[0], 77), 49407)  # any text: only image_embeds are read
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    return [e / e.norm() for e in out.image_embeds]


def _clip_text_ref(model: CLIPModel, prompts: list[str]) -> list[torch.Tensor]:
    tokenizer = CLIPTokenizer.from_pretrained(str(ASSET_DIR), pad_token="<|endoftext|>", local_files_only=True)
    tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, pixel_values=torch.zeros(len(prompts), 3, 32, 32))
    return [e / e.norm() for e in out.text_embeds]


def _dino_ref(model, images: torch.Tensor) -> list[torch.Tensor]:
    pixels = (_resize_crop(images, 256, 224) - IMAGENET_MEAN) / IMAGENET_STD
    extra = {"interpolate_pos_encoding": True} if isinstance(model, ViTModel) else {}
    with torch.no_grad():
        cls = model(pixel_values=pixels, **extra).last_hidden_state[:, 0]
    return [e / e.norm() for e in cls]


def _pairwise_clipped_mean(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = 0.0
    for x in a:
        for y in b:
            total += max(0.0, float(torch.dot(x, y)))
    return total / (len(a) * len(b))


# ---------------------------------------------------------------- CLIP

def test_clip_image_embeddings_match_the_model_called_directly(clip_scorer, clip_model):
    images = _images(3, 32, 32, seed=0)  # native size: preprocessing is normalization only
    got = clip_scorer.image_embeddings(images)
    assert got.shape == (3, 16)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(got, torch.stack(_clip_image_ref(clip_model, images)), atol=1e-5, rtol=1e-4)


def test_clip_preprocessing_resizes_shorter_side_and_center_crops(clip_scorer, clip_model):
    wide, tall = _smooth_images(2, 40, 56, seed=1), _smooth_images(1, 70, 45, seed=2)
    pixels = metrics.preprocess_images(wide, resize=32, crop=32, mean=CLIP_MEAN.flatten().tolist(),
                                       std=CLIP_STD.flatten().tolist())
    torch.testing.assert_close(pixels, (_resize_crop(wide, 32, 32) - CLIP_MEAN) / CLIP_STD)
    # Same geometry as the transformers CLIP image processor (shortest_edge, then center crop).
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    hf = processor(images=list(wide), do_rescale=False, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, hf, atol=1e-4, rtol=0)
    # A list of differently sized images is embedded image by image.
    got = clip_scorer.image_embeddings([wide[0], tall[0], wide[1]])
    ref = _clip_image_ref(clip_model, wide) + _clip_image_ref(clip_model, tall)
    torch.testing.assert_close(got, torch.stack([ref[0], ref[2], ref[1]]), atol=1e-5, rtol=1e-4)


def test_clip_t_matches_independent_computation(clip_scorer, clip_model):
    images = _images(3, 48, 32, seed=3)
    prompts = ["a photo of a <v*> dog", "<v*> on the beach", "a <v*> dog in the snow"]
    got = clip_t(clip_scorer, images, prompts, class_word="dog", token="<v*>")
    rewritten = ["a photo of a dog", "dog on the beach", "a dog in the snow"]
    img, txt = _clip_image_ref(clip_model, images), _clip_text_ref(clip_model, rewritten)
    want = sum(max(0.0, float(torch.dot(i, t))) for i, t in zip(img, txt)) / 3
    assert got == pytest.approx(want, abs=1e-5)


def test_clip_i_matches_explicit_pairwise_loop(clip_scorer, clip_model):
    generated, references = _images(3, 40, 40, seed=4), _images(2, 32, 48, seed=5)
    got = clip_i(clip_scorer, generated, references)
    want = _pairwise_clipped_mean(_clip_image_ref(clip_model, generated), _clip_image_ref(clip_model, references))
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=1e-5)


def test_identical_images_score_one(clip_scorer, dino_folders):
    same = _images(1, 36, 36, seed=6).expand(3, -1, -1, -1)
    assert clip_i(clip_scorer, same, same[:2]) == pytest.approx(1.0, abs=1e-5)
    assert dino(load_dino_metric_model(dino_folders["dinov2"]), same, same) == pytest.approx(1.0, abs=1e-5)
    distinct = _images(3, 36, 36, seed=7)
    assert clip_i(clip_scorer, distinct, distinct) < 1.0  # all pairs, not only the diagonal


def test_clip_folder_tokenizer_is_used_and_pads_with_end_token(tmp_path, clip_folder):
    assert load_clip_metric_model(clip_folder).tokenizer.pad_token == "<|endoftext|>"
    folder = tmp_path / "clip_with_tokenizer"
    shutil.copytree(clip_folder, folder)
    vocab = json.loads((ASSET_DIR / "vocab.json").read_text(encoding="utf-8"))
    vocab["dog</w>"], vocab["cat</w>"] = vocab["cat</w>"], vocab["dog</w>"]  # a detectable change
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(ASSET_DIR / "merges.txt", folder / "merges.txt")
    tokenizer = load_clip_metric_model(folder).tokenizer
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("dog</w>") == vocab["dog</w>"]


# ---------------------------------------------------------------- DINO

@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_dino_matches_explicit_pairwise_loop(dino_folders, kind):
    scorer = load_dino_metric_model(dino_folders[kind])
    generated, references = _images(2, 240, 300, seed=8), _images(3, 256, 256, seed=9)
    got = dino(scorer, generated, references)
    model_cls = Dinov2Model if kind == "dinov2" else ViTModel
    extra = {"add_pooling_layer": False} if kind == "vit" else {}
    model = model_cls.from_pretrained(str(dino_folders[kind]), local_files_only=True, **extra).eval()
    want = _pairwise_clipped_mean(_dino_ref(model, generated), _dino_ref(model, references))
    assert got == pytest.approx(want, abs=1e-5)


def test_dinov2_single_safetensors_file_is_recognised(tmp_path):
    torch.manual_seed(2)  # width 384 is a registered DINOv2 width, so the config is inferred exactly
    model = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                                     mlp_ratio=1, image_size=28, patch_size=14)).eval()
    model.save_pretrained(tmp_path)
    scorer = load_dino_metric_model(tmp_path / "model.safetensors")
    assert isinstance(scorer.model, Dinov2Model)
    images = _images(2, 224, 224, seed=10)
    torch.testing.assert_close(scorer.image_embeddings(images), torch.stack(_dino_ref(model, images)),
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- clipping at 0

def test_negative_cosines_are_clipped_per_pair(clip_scorer, monkeypatch):
    e = F.normalize(torch.tensor([[1.0, 2.0, 0.5]]), dim=-1)
    fake = {"gen": torch.cat([e, -e]), "ref": e}  # cosines +1 and -1
    monkeypatch.setattr(clip_scorer, "image_embeddings", lambda images: fake[images])
    assert clip_i(clip_scorer, "gen", "ref") == pytest.approx(0.5)  # unclipped mean would be 0
    # CLIP-T: image 0 matches its prompt (cos +1), image 1 is opposite to its prompt (cos -1).
    monkeypatch.setattr(clip_scorer, "image_embeddings", lambda images: fake["gen"])
    monkeypatch.setattr(clip_scorer, "text_embeddings", lambda prompts: torch.cat([e, e]))
    assert clip_t(clip_scorer, torch.zeros(2, 3, 8, 8), ["a", "b"]) == pytest.approx(0.5)


def test_all_negative_pairs_give_zero():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    assert metrics.mean_clipped_cosine(a, -a) == 0.0
    assert metrics.mean_clipped_cosine(a, a) == pytest.approx((1 + 0.6 + 0.6 + 1) / 4)


# ---------------------------------------------------------------- CLIP-T prompt rewriting

@pytest.mark.parametrize("prompt,class_word,expected", [
    ("a photo of a <v*> dog", "dog", "a photo of a dog"),        # token + class word -> class word
    ("a photo of <v*> dog", None, "a photo of dog"),             # no class word: token deleted
    ("<v*> on the beach", "dog", "dog on the beach"),            # token alone -> class word
    ("<v*> on the beach", None, "on the beach"),
    ("a <v*> Dog, swimming", "dog", "a Dog, swimming"),          # class word matched case-insensitively
    ("a photo of <v*>, in the snow", None, "a photo of, in the snow"),
    ("a <v*> dogs", "dog", "a dog dogs"),                        # class word must follow as a whole word
    ("a photo of a dog", "dog", "a photo of a dog"),             # no token: unchanged
])
def test_clip_t_prompt_rewrites_the_identifier(prompt, class_word, expected):
    assert clip_t_prompt(prompt, "<v*>", class_word) == expected


def test_clip_t_prompt_matches_the_token_as_a_whole_word():
    assert clip_t_prompt("a sks dog asks", "sks", "dog") == "a dog asks"
    assert clip_t_prompt("a sks dog", None, "dog") == "a sks dog"


def test_clip_t_scores_the_rewritten_prompts(clip_scorer, monkeypatch):
    seen = []
    real = clip_scorer.text_embeddings
    monkeypatch.setattr(clip_scorer, "text_embeddings", lambda prompts: seen.extend(prompts) or real(prompts))
    clip_t(clip_scorer, _images(2, 32, 32, seed=11), ["a photo of a <v*> dog", "<v*> swimming"],
           class_word="dog", token="<v*>")
    assert seen == ["a photo of a dog", "dog swimming"]


# ---------------------------------------------------------------- evaluate and errors

def test_evaluate_returns_the_metrics_of_the_given_backbones(clip_folder, clip_scorer, dino_folders):
    generated, references = _images(2, 40, 40, seed=12), _images(2, 40, 40, seed=13)
    prompts = ["a photo of a <v*> dog", "a <v*> dog on the grass"]
    only_clip = evaluate(generated, references, prompts, token="<v*>", class_word="dog", clip_path=clip_folder)
    assert set(only_clip) == {"clip_t", "clip_i"}
    assert only_clip["clip_t"] == pytest.approx(clip_t(clip_scorer, generated, prompts, "dog", "<v*>"), abs=1e-6)
    assert only_clip["clip_i"] == pytest.approx(clip_i(clip_scorer, generated, references), abs=1e-6)
    both = evaluate(generated, references, prompts, token="<v*>", class_word="dog",
                    clip_path=clip_folder, dino_path=dino_folders["vit"])
    assert list(both) == ["clip_t", "clip_i", "dino"]
    want = dino(load_dino_metric_model(dino_folders["vit"]), generated, references)
    assert both["dino"] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("wanted,match", [
    (["clip_i"], r"CLIP-I needs a CLIP ViT-L/14-336 folder \(transformers format: config\.json \+ "
                 r"model\.safetensors.*pass clip_path=\.\.\."),
    (["clip_t"], r"CLIP-T needs a CLIP ViT-L/14-336 folder.*pass clip_path="),
    (["dino"], r"DINO needs a DINOv2 ViT-L/14 folder \(transformers format: config\.json \+ "
               r"model\.safetensors.*pass dino_path=\.\.\."),
])
def test_evaluate_names_the_missing_backbone_file(wanted, match):
    images = _images(1, 32, 32, seed=14)
    with pytest.raises(MetricsError, match=match):
        evaluate(images, images, ["a <v*> dog"], token="<v*>", class_word="dog", metrics=wanted)


def test_evaluate_refuses_nothing_unknown_and_bad_prompts(clip_folder):
    images = _images(2, 32, 32, seed=15)
    with pytest.raises(MetricsError, match=r"nothing to evaluate: pass clip_path=.*dino_path="):
        evaluate(images, images, None, token="<v*>", class_word="dog")
    with pytest.raises(MetricsError, match=r"unknown metric\(s\) \['fid'\]; valid metrics: clip_t, clip_i, dino"):
        evaluate(images, images, None, token=None, class_word=None, clip_path=clip_folder, metrics=["fid"])
    with pytest.raises(MetricsError, match="CLIP-T needs the prompts"):
        evaluate(images, images, None, token=None, class_word=None, clip_path=clip_folder)
    with pytest.raises(MetricsError, match="one prompt per generated image: got 3 prompts for 2 images"):
        evaluate(images, images, ["a", "b", "c"], token=None, class_word=None, clip_path=clip_folder)


def test_missing_or_wrong_folders_name_the_needed_file(tmp_path, clip_folder):
    with pytest.raises(MetricsError, match=r"does not exist; CLIP-T/CLIP-I need a CLIP ViT-L/14-336 folder"):
        load_clip_metric_model(tmp_path / "nowhere")
    with pytest.raises(MetricsError, match=r"DINO metric model not found at .*DINOv2 ViT-L/14 folder"):
        load_dino_metric_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MetricsError, match=r"has no config\.json; CLIP needs"):
        load_clip_metric_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "clip"}), encoding="utf-8")
    with pytest.raises(MetricsError, match=r"no model\.safetensors; DINO needs"):
        load_dino_metric_model(empty)
    vision_only = tmp_path / "vision_only"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vision_only)
    with pytest.raises(MetricsError, match=r"image-only CLIP; CLIP-T needs the text tower"):
        load_clip_metric_model(vision_only)
    with pytest.raises(MetricsError, match=r"holds a 'clip' model, not DINOv2 or DINO ViT"):
        load_dino_metric_model(clip_folder)
    (tmp_path / "cut.safetensors").write_bytes(b"\x40" + bytes(20))
    with pytest.raises(MetricsError, match=r"cut.safetensors is not a readable safetensors file \(.*\): DINO needs"):
        load_dino_metric_model(tmp_path / "cut.safetensors")
    assert issubclass(MetricsError, EchoDistillError)


def test_images_outside_unit_range_are_refused(clip_scorer):
    with pytest.raises(MetricsError, match=r"metrics take \[0, 1\] pixels \(from \[-1, 1\] use \(x \+ 1\) / 2\)"):
        clip_scorer.image_embeddings(_images(1, 32, 32, seed=16) * 2 - 1)
    with pytest.raises(MetricsError, match=r"must be \(N, 3, H, W\)"):
        clip_scorer.image_embeddings(torch.rand(2, 4, 32, 32))
    with pytest.raises(MetricsError, match="no images given"):
        clip_scorer.image_embeddings([])
    assert not math.isnan(clip_i(clip_scorer, _images(1, 32, 32, seed=17), _images(1, 32, 32, seed=18)))
