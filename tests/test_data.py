"""Concept data pipeline: image reading, captions, augmentation, masks, reproducibility."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from echodistill.errors import ConfigError, DataError
from echodistill.training.data import (
    FAR_PREFIXES,
    NEAR_PREFIXES,
    ConceptBatch,
    ConceptDataset,
    ConceptImage,
    load_concept_images,
)
from echodistill.training.photos import EmptyCaptionWarning
from echodistill.training.templates import PROMPT_TEMPLATES, render_prompt

RES = 64  # tiny resolution: 8x8 latent cells with latent_scale 8
TOKEN, CLASS_WORD = "<v*>", "dog"


def _noise_image(seed: int, size=(80, 72), low=0, high=256) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(low, high, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _bright_images(count: int = 3) -> list[ConceptImage]:
    # strictly above mid-grey, so after [-1, 1] scaling no image pixel is 0 and the grey
    # canvas of a far-away sample is exactly where pixels are 0
    return [
        ConceptImage(_noise_image(i, low=170, high=256), None, f"img{i}") for i in range(count)
    ]


def _dataset(**kwargs) -> ConceptDataset:
    kwargs.setdefault("resolution", RES)
    images = kwargs.pop("images", None) or _bright_images()
    return ConceptDataset(images, token=TOKEN, class_word=CLASS_WORD, **kwargs)


def _prefix_of(prompt: str) -> str:
    for prefix in FAR_PREFIXES + NEAR_PREFIXES:
        if prompt.startswith(prefix):
            return prefix
    return ""


# --------------------------------------------------------------------------- templates


def test_templates_are_25_with_one_placeholder_each():
    assert len(PROMPT_TEMPLATES) == 25
    assert len(set(PROMPT_TEMPLATES)) == 25
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


def test_render_prompt_fills_subject_and_prefix():
    assert render_prompt("a photo of a {}", TOKEN, CLASS_WORD) == "a photo of a <v*> dog"
    assert render_prompt("a photo of a {}", TOKEN, CLASS_WORD, "close up") == (
        "close up a photo of a <v*> dog"
    )
    no_class = render_prompt("a photo of a {}", TOKEN, "", "a far away ")
    assert no_class == "a far away a photo of a <v*>"
    with pytest.raises(ConfigError, match="2 '\\{\\}' placeholders"):
        render_prompt("a {} of a {}", TOKEN, CLASS_WORD)


# --------------------------------------------------------------------------- loading


def test_exif_orientation_is_applied(tmp_path):
    # stored 60 wide x 40 tall, top half red; orientation 6 = display rotated 90 deg clockwise,
    # so the upright image is 40 x 60 with the red half on the right
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)

    (item,) = load_concept_images(tmp_path, resolution=64)
    assert item.image.size == (40, 60)
    red, green, blue = item.image.getpixel((35, 30))
    assert red > 200 and blue < 60
    red, green, blue = item.image.getpixel((5, 30))
    assert blue > 200 and red < 60


def test_modes_are_converted_to_8bit_rgb(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half fully transparent
    rgba.save(tmp_path / "a_rgba.png")
    Image.new("L", (40, 40), 100).save(tmp_path / "b_gray.png")
    deep = np.full((40, 40), 65535, dtype=np.uint16)
    deep[:, :20] = 257 * 100
    deep[:20, :20] = 0
    Image.fromarray(deep).save(tmp_path / "c_16bit.png")
    Image.new("LA", (40, 40), (50, 0)).save(tmp_path / "d_la.png")  # transparent -> white
    Image.new("CMYK", (40, 40), (0, 0, 0, 0)).save(tmp_path / "e_cmyk.jpg")

    items = load_concept_images(tmp_path, resolution=64)
    assert [i.name for i in items] == ["a_rgba.png", "b_gray.png", "c_16bit.png", "d_la.png",
                                       "e_cmyk.jpg"]
    assert all(i.image.mode == "RGB" for i in items)
    rgba_out, gray_out, deep_out, la_out, cmyk_out = (i.image for i in items)
    assert rgba_out.getpixel((5, 5)) == (255, 255, 255)
    assert rgba_out.getpixel((30, 5)) == (255, 0, 0)
    assert gray_out.getpixel((5, 5)) == (100, 100, 100)
    assert deep_out.getpixel((30, 30)) == (255, 255, 255)  # 65535 -> 255, not clipped garbage
    assert deep_out.getpixel((5, 30)) == (100, 100, 100)  # 25700 -> 100: scaled, not clipped
    assert deep_out.getpixel((5, 5)) == (0, 0, 0)
    assert la_out.getpixel((5, 5)) == (255, 255, 255)
    assert cmyk_out.getpixel((5, 5)) == (255, 255, 255)


def test_in_memory_images_in_32bit_and_half_transparent_modes():
    int_image = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).convert("I")
    assert int_image.mode == "I"
    half = Image.new("RGBA", (40, 40), (0, 0, 0, 128))
    palette = Image.new("P", (40, 40), 0)
    palette.info["transparency"] = 0
    items = load_concept_images([int_image, half, palette], resolution=64)
    assert items[0].image.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in items[1].image.getpixel((0, 0)))
    assert items[2].image.getpixel((0, 0)) == (255, 255, 255)
    assert [i.name for i in items] == ["image_000", "image_001", "image_002"]


def test_folder_sorting_hidden_files_and_sidecar_captions(tmp_path):
    for name in ["b.png", "a.jpg", "c.webp", ".hidden.png"]:
        _noise_image(0).save(tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "a.txt").write_text("a photo of {} on the\ngrass\n", encoding="utf-8")
    (tmp_path / "c.webp.txt").write_text("  ", encoding="utf-8")  # empty caption = none, with a warning

    with pytest.warns(EmptyCaptionWarning) as caught:
        items = load_concept_images(tmp_path, resolution=64)
    assert [i.name for i in items] == ["a.jpg", "b.png", "c.webp"]
    assert [i.caption for i in items] == ["a photo of {} on the grass", None, None]
    assert [str(w.message) for w in caught] == [  # once, naming the file
        f"1 caption file(s) in {str(tmp_path)!r} are empty, so their photos train with the prompt templates instead: "
        "c.webp.txt; write a caption in each (e.g. 'a photo of {} on the grass') or delete them"]

    with pytest.warns(EmptyCaptionWarning, match="c.webp.txt"):
        items = load_concept_images(tmp_path, resolution=64, captions={"b": "my <v*> dog"})
    assert [i.caption for i in items] == ["a photo of {} on the grass", "my <v*> dog", None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a caption given for that photo replaces the empty file: nothing to say
        items = load_concept_images(tmp_path, resolution=64, captions=[None, None, "x <v*>"])
    assert [i.caption for i in items] == ["a photo of {} on the grass", None, "x <v*>"]

    with pytest.raises(DataError, match="2 captions were given for 3 images"):
        load_concept_images(tmp_path, resolution=64, captions=["x", "y"])
    with pytest.raises(DataError, match="not found: zebra.png"):
        load_concept_images(tmp_path, resolution=64, captions={"zebra.png": "x"})


def test_corrupt_files_are_all_listed(tmp_path):
    _noise_image(0).save(tmp_path / "good.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    _noise_image(1).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.png").unlink()

    with pytest.raises(DataError, match="2 file\\(s\\) in .* could not be read") as info:
        load_concept_images(tmp_path, resolution=64)
    message = str(info.value)
    assert "garbage.jpg" in message and "truncated.png" in message
    assert "good.png" not in message


def test_missing_paths_in_a_list_are_listed(tmp_path):
    _noise_image(0).save(tmp_path / "good.png")
    with pytest.raises(DataError, match="file not found") as info:
        load_concept_images([tmp_path / "good.png", tmp_path / "gone1.jpg", tmp_path / "gone2.jpg"],
                            resolution=64)
    assert "gone1.jpg" in str(info.value) and "gone2.jpg" in str(info.value)


def test_too_small_images_are_listed_with_sizes(tmp_path):
    _noise_image(0, size=(300, 260)).save(tmp_path / "ok.png")
    _noise_image(1, size=(200, 180)).save(tmp_path / "small1.png")
    _noise_image(2, size=(100, 400)).save(tmp_path / "small2.png")
    with pytest.raises(DataError, match=r"below 256 px \(0.5 of the 512-px training resolution") as info:
        load_concept_images(tmp_path, resolution=512, min_size_fraction=0.5)
    message = str(info.value)
    assert "small1.png (200x180)" in message and "small2.png (100x400)" in message
    assert "ok.png" not in message
    assert len(load_concept_images(tmp_path, resolution=512, min_size_fraction=0.15)) == 3


def test_empty_or_missing_folder_errors(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    pattern = r"no usable image in folder .*found only: readme\.md.*\.jpg"
    with pytest.raises(DataError, match=pattern):
        load_concept_images(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_concept_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no concept images were given"):
        load_concept_images([])


# --------------------------------------------------------------------------- sampling


def test_batch_shapes_ranges_and_indices():
    batch = _dataset().sample_batch(5, torch.Generator().manual_seed(0))
    assert isinstance(batch, ConceptBatch) and len(batch) == 5
    assert batch.pixel_values.shape == (5, 3, RES, RES)
    assert batch.pixel_values.dtype == torch.float32 and batch.mask.dtype == torch.float32
    assert batch.mask.shape == (5, 1, RES // 8, RES // 8)
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    assert set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert sorted(batch.indices[:3]) == [0, 1, 2]  # no repeats while the batch fits
    assert all(0 <= i < 3 for i in batch.indices)


def test_mask_semantics_far_away_and_zoomed():
    dataset = _dataset(flip=False)
    references = dataset.reference_pixel_values()
    batch = dataset.sample_batch(96, torch.Generator().manual_seed(1))
    kinds = {"far": 0, "near": 0, "plain": 0}
    for pixels, mask, prompt, index in zip(batch.pixel_values, batch.mask, batch.prompts,
                                           batch.indices):
        assert TOKEN in prompt and CLASS_WORD in prompt
        prefix = _prefix_of(prompt)
        if prefix in FAR_PREFIXES:
            kinds["far"] += 1
            filled = (pixels != 0).any(dim=0)  # (H, W) where the shrunk image lies
            rows, cols = filled.any(dim=1).nonzero(), filled.any(dim=0).nonzero()
            top, bottom = rows.min().item(), rows.max().item() + 1
            left, right = cols.min().item(), cols.max().item() + 1
            assert bottom - top == right - left and (bottom - top) % 2 == 0
            assert bottom - top < 0.6 * RES
            assert filled[top:bottom, left:right].all()
            assert filled.sum() == (bottom - top) ** 2  # everything else is exactly 0
            assert 0 < mask.mean() < 1
            # valid cells are exactly the 8x8 cells lying wholly inside the pasted square
            full = torch.zeros(RES // 8, RES // 8)
            for r in range(RES // 8):
                for c in range(RES // 8):
                    cell = filled[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8]
                    full[r, c] = float(cell.all())
            assert torch.equal(mask[0], full)
        elif prefix in NEAR_PREFIXES:
            kinds["near"] += 1
            assert mask.min() == 1
            assert not torch.equal(pixels, references[index])  # a crop of an enlarged image
        else:
            kinds["plain"] += 1
            assert mask.min() == 1
            assert torch.equal(pixels, references[index])
    assert all(count > 0 for count in kinds.values()), kinds


def test_same_seed_reproduces_and_another_seed_differs():
    dataset = _dataset()
    first = dataset.sample_batch(6, torch.Generator().manual_seed(7))
    again = dataset.sample_batch(6, torch.Generator().manual_seed(7))
    other = dataset.sample_batch(6, torch.Generator().manual_seed(8))
    assert torch.equal(first.pixel_values, again.pixel_values)
    assert torch.equal(first.mask, again.mask)
    assert first.prompts == again.prompts and first.indices == again.indices
    assert not torch.equal(first.pixel_values, other.pixel_values)
    assert first.prompts != other.prompts


def test_no_augmentation_gives_center_crop_full_mask_and_no_prefix():
    wide = ConceptImage(_noise_image(3, size=(96, 64)), None, "wide")
    dataset = _dataset(images=[wide], augment=False, flip=False)
    batch = dataset.sample_batch(8, torch.Generator().manual_seed(0))
    crop = torch.from_numpy(np.array(wide.image)[:, 16:80]).permute(2, 0, 1)  # (3, 64, 64)
    expected = crop.float() / 127.5 - 1
    assert torch.allclose(batch.pixel_values[0], expected)  # 64 px square: crop only
    assert (batch.pixel_values == batch.pixel_values[0]).all()
    assert batch.mask.min() == 1
    assert all(_prefix_of(p) == "" for p in batch.prompts)
    assert len(set(batch.prompts)) > 1  # templates still vary

    flipping = _dataset(images=[wide], augment=False, flip=True)
    flips = flipping.sample_batch(16, torch.Generator().manual_seed(0)).pixel_values
    assert any(torch.equal(p, expected.flip(-1)) for p in flips)
    assert any(torch.equal(p, expected) for p in flips)


def test_captions_replace_templates_and_keep_prefixes():
    images = _bright_images(2)
    images[0].caption = "a {} on a red sofa"
    dataset = _dataset(images=images)
    batch = dataset.sample_batch(64, torch.Generator().manual_seed(2))
    captioned = [p for p, i in zip(batch.prompts, batch.indices) if i == 0]
    assert captioned
    for prompt in captioned:
        assert prompt.removeprefix(_prefix_of(prompt)) == "a <v*> dog on a red sofa"
    assert any(_prefix_of(p) for p in captioned)

    images[0].caption = "a dog on a sofa"
    with pytest.warns(UserWarning, match="do not contain the token"):
        _dataset(images=images)


def test_dataset_rejects_bad_settings():
    with pytest.raises(ConfigError, match="multiple of latent_scale"):
        _dataset(resolution=60)
    with pytest.raises(ConfigError, match="placeholders"):
        _dataset(templates=["a photo"])
    with pytest.raises(DataError, match="no concept images"):
        ConceptDataset([], token=TOKEN, class_word=CLASS_WORD)


def test_the_rescale_has_a_lower_bound_taken_from_the_config():
    from echodistill.training.config import TrainConfig

    dataset = _dataset(flip=False, min_scale=0.5)
    batch = dataset.sample_batch(96, torch.Generator().manual_seed(1))
    spans = []
    for pixels, prompt in zip(batch.pixel_values, batch.prompts):
        if _prefix_of(prompt) in FAR_PREFIXES:
            filled = (pixels != 0).any(dim=0)
            spans.append(int(filled.any(dim=1).sum()))
    assert spans and min(spans) >= RES // 2  # never below half the picture
    # Custom Diffusion's R/3 by default: the smallest draw at 192 px is 64 px
    assert ConceptDataset(_bright_images(), token=TOKEN, class_word=CLASS_WORD, resolution=192)._draw_scale(0.0, 0.0) == 64
    config = TrainConfig(resolution=RES, augment_min_scale=0.5, token=TOKEN, class_word=CLASS_WORD)
    assert ConceptDataset.from_config(_bright_images(), config, latent_scale=8).min_scale == 0.5
    with pytest.raises(ConfigError, match=r"augment_min_scale=0 must be in \(0, 1\]"):
        TrainConfig(augment_min_scale=0)
    with pytest.raises(ConfigError, match=r"min_scale=1.5 must be in \(0, 1\]"):
        _dataset(min_scale=1.5)
