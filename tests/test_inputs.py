"""What users hand us: photo folders with odd files, unreadable folders, and ComfyUI IMAGEs of any
channel count. Every command and node reads photos through one loader with the same errors, and
every photo given is used or named with the reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from echodistill.cli import main
from echodistill.errors import DataError
from echodistill.training.photos import load_concept_images

REPO = Path(__file__).resolve().parents[1]


def _convert():
    """nodes/convert.py on its own (it needs no ComfyUI); the pack's `nodes` name is ComfyUI's own."""
    spec = importlib.util.spec_from_file_location("echodistill_nodes_convert", REPO / "nodes" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(tmp_path: Path, name: str = "photos") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 72), (40 * i, 120, 200)).save(folder / f"p{i}.png")
    Image.new("P", (80, 72)).save(folder / "z_extra.gif")
    (folder / "p0.txt").write_text("a caption")  # a sidecar: read, not a skipped file
    (folder / "notes.json").write_text("{}")
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden: not the user's photo
    (folder / "older").mkdir()
    return folder


def test_every_file_of_a_folder_is_used_or_named_with_the_reason(tmp_path):
    photos = load_concept_images(_folder(tmp_path), resolution=64)
    assert [p.name for p in photos] == ["p0.png", "p1.png", "p2.png"]
    skipped = dict(photos.skipped)
    assert set(skipped) == {"z_extra.gif", "notes.json", "older"}
    assert "GIF" in skipped["z_extra.gif"] and "PNG or JPEG" in skipped["z_extra.gif"]
    assert "subfolder" in skipped["older"]
    report = photos.report()
    assert "3 photo(s) used" in report and "z_extra.gif (GIF" in report


def test_broken_links_among_the_photos_are_named_as_such(tmp_path):
    folder = _folder(tmp_path)
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    skipped = dict(load_concept_images(folder, resolution=64).skipped)
    for name in ("gone.png", "loop_a.png", "loop_b.png"):
        assert skipped[name].startswith("a broken symbolic link"), skipped


def test_cli_train_names_the_files_it_does_not_use(tmp_path, capsys):
    folder = _folder(tmp_path)
    code = main(["train", "--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student"),
                 "--images", str(folder), "--class-word", "mug", "--out", str(tmp_path / "c.safetensors"),
                 "--steps", "1", "--resolution", "64", "--set", "echo=false"])
    out = capsys.readouterr()
    assert "z_extra.gif (GIF" in out.out and "notes.json" in out.out
    assert code == 2 and out.err.startswith("error:")  # the missing teacher, after the photo report


def test_a_folder_of_only_unusable_files_names_each(tmp_path):
    folder = tmp_path / "gifs"
    folder.mkdir()
    Image.new("P", (80, 72)).save(folder / "a.gif")
    with pytest.raises(DataError, match=r"a.gif \(GIF"):
        load_concept_images(folder)


@pytest.mark.parametrize("problem", ["missing", "truncated", "not an image"])
def test_eval_reports_bad_photo_folders_as_train_does(problem, tmp_path, capsys):
    """`eval` reads both folders through the shared loader: one `error:` line, no traceback."""
    images = _folder(tmp_path, "images")
    references = tmp_path / "refs"
    if problem != "missing":
        references.mkdir()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(references / "good.png")
        bad = references / "bad.png"
        if problem == "truncated":
            Image.new("RGB", (64, 64), (9, 9, 9)).save(bad)
            bad.write_bytes(bad.read_bytes()[:60])
        else:
            bad.write_text("hello")
    code = main(["eval", "--images", str(images), "--references", str(references), "--class-word", "mug"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()
    assert any(line.startswith("error:") for line in last) and "Traceback" not in err
    assert "error: --references: " in err  # which of the two folders
    if problem == "missing":
        assert "does not exist" in err
    else:
        assert "bad.png" in err
    assert "z_extra.gif (GIF" in err  # the generated-images folder's report came first


def test_eval_reads_prompts_from_our_png_chunks(tmp_path):
    from echodistill.cli.after_training import PNG_KEY, _read_images
    from PIL.PngImagePlugin import PngInfo

    folder = tmp_path / "samples"
    folder.mkdir()
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps({"prompt": "a photo of <v*> mug"}))
    Image.new("RGB", (32, 32), (5, 6, 7)).save(folder / "a.png", pnginfo=info)
    Image.new("RGB", (32, 32), (5, 6, 7)).save(folder / "b.png")
    images, prompts = _read_images(str(folder), "images")
    assert prompts == ["a photo of <v*> mug", None] and images[0].shape == (3, 32, 32)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_comfy_images_of_every_channel_count_convert(channels):
    convert = _convert()
    images = torch.rand(2, 8, 6, channels)
    rgb = convert.rgb_comfy_images(images)
    assert rgb.shape == (2, 8, 6, 3) and rgb.dtype == torch.float32
    if channels == 1:
        assert torch.equal(rgb[..., 0], rgb[..., 2]) and torch.allclose(rgb[..., 0], images[..., 0])
    if channels == 4:
        alpha = images[..., 3:]
        torch.testing.assert_close(rgb, images[..., :3] * alpha + 1 - alpha)
    assert convert.from_comfy_images(images).shape == (2, 3, 8, 6)
    assert [p.mode for p in convert.to_pil_list(images)] == ["RGB", "RGB"]
    assert convert.rgb_comfy_images(images[0]).shape == (1, 8, 6, 3)  # one image without a batch axis


@pytest.mark.parametrize("shape,message", [((2, 8, 6, 5), "5 channels"), ((0, 8, 6, 3), "empty"),
                                           ((1, 2, 8, 6, 3), "shape")])
def test_comfy_images_that_are_no_pictures_are_refused_clearly(shape, message):
    with pytest.raises(ValueError, match=message):
        _convert().rgb_comfy_images(torch.rand(shape), "references")


# --- model families a user may hand us ------------------------------------------------------------


def _keys_file(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


SDXL_KEYS = {
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,),
    "conditioner.embedders.1.model.ln_final.weight": (4,),
    "model.diffusion_model.label_emb.0.0.weight": (4, 4),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048),
}
SD3_KEYS = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (4,)}
FLUX_KEYS = {"double_blocks.0.img_attn.qkv.weight": (4, 4), "single_blocks.0.linear1.weight": (4, 4)}
SDXL_REFINER_KEYS = {
    "conditioner.embedders.0.model.ln_final.weight": (4,),
    "model.diffusion_model.label_emb.0.0.weight": (4, 4),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 1280),
}


@pytest.mark.parametrize("keys,name", [(SDXL_REFINER_KEYS, "an SDXL refiner"), (SD3_KEYS, "Stable Diffusion 3"),
                                       (FLUX_KEYS, "a Flux model")])
@pytest.mark.parametrize("family", ["auto", "sd21-base"])
def test_unsupported_families_are_named_with_the_pair_to_use(keys, name, family, tmp_path):
    """Named plainly, with the supported pair, whether or not a family is given: no dead end."""
    from echodistill.models.loading import ModelSource
    from echodistill.models.families import UnsupportedModelError

    path = _keys_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(UnsupportedModelError) as caught:
        ModelSource.open(path, family)
    message = str(caught.value)
    assert name in message and "SD-Turbo" in message and "sd_turbo.safetensors" in message
    assert "name its family" not in message


def test_an_sdxl_file_read_as_an_sd2_family_is_refused_naming_the_families(tmp_path):
    from echodistill.errors import ModelLoadError
    from echodistill.models.loading import ModelSource

    path = _keys_file(tmp_path / "model.safetensors", SDXL_KEYS)
    with pytest.raises(ModelLoadError, match="is an SDXL checkpoint .* family 'sd21-base' was named: name one of "
                                             "sdxl-base or sdxl-turbo"):
        ModelSource.open(path, "sd21-base")
    assert ModelSource.open(path).family == "sdxl-base"  # detected from its keys


def test_cli_names_an_sdxl_teacher_in_one_error_line(tmp_path, capsys):
    path = _keys_file(tmp_path / "sdxl.safetensors", SDXL_KEYS)
    code = main(["train", "--teacher", str(path), "--student", str(path), "--images", str(_folder(tmp_path)),
                 "--class-word", "mug", "--out", str(tmp_path / "c.safetensors"), "--teacher-family", "sd21-base",
                 "--resolution", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "SDXL" in err and "Traceback" not in err


def test_sdxl_refiner_diffusers_folder_is_named(tmp_path):
    from echodistill.models.loading import ModelSource
    from echodistill.models.families import UnsupportedModelError

    folder = tmp_path / "refiner"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1280}))
    with pytest.raises(UnsupportedModelError, match="an SDXL refiner"):
        ModelSource.open(folder)


def _plain_photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (80, 72), (10 * i, 120, 200)).save(folder / f"p{i:02d}.png")
    return folder


def test_a_concept_needs_three_photos_and_more_than_twenty_are_used_with_a_warning(tmp_path):
    from echodistill.training.photos import MAX_PHOTOS, MIN_PHOTOS, PhotoCountWarning, check_photo_count

    assert (MIN_PHOTOS, MAX_PHOTOS) == (3, 20)  # DESIGN.md section 1: "a few (3-20) photos"
    folder = _plain_photos(tmp_path / "two", 2)
    Image.new("P", (80, 72)).save(folder / "z.gif")
    with pytest.raises(DataError) as refused:
        check_photo_count(load_concept_images(folder, resolution=64), f"--images {folder}")
    message = str(refused.value)
    assert message.startswith(f"--images {folder}: 2 photo(s) (p00.png, p01.png), but a concept is learned from 3 to "
                              "20 photos of the subject: add at least 1 more"), message
    assert message.endswith("1 other file(s) there are not read as photos: z.gif"), message
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # three, five (the mini world's references) and twenty pass in silence
        for count in (3, 5, 20):
            check_photo_count(load_concept_images(_plain_photos(tmp_path / f"n{count}", count), resolution=64), "x")
    many = load_concept_images(_plain_photos(tmp_path / "many", 21), resolution=64)
    with pytest.warns(PhotoCountWarning, match="many: 21 photos, more than the 3-20 the method is made for; training "
                                               "uses all 21"):
        check_photo_count(many, "many")


def test_train_refuses_two_photos_and_warns_once_about_too_many(tmp_path, capsys):
    def train(folder):
        return main(["train", "--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student"),
                     "--images", str(folder), "--class-word", "mug", "--out", str(tmp_path / "c.safetensors")])

    two = _plain_photos(tmp_path / "two", 2)
    assert train(two) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --images {two}: 2 photo(s) (p00.png, p01.png), but a concept is learned from 3 to 20 "
                   "photos of the subject: add at least 1 more (other angles, backgrounds, lighting)\n"), err
    many = _plain_photos(tmp_path / "many", 21)
    assert train(many) == 2  # no teacher: the photos were checked first, and kept
    captured = capsys.readouterr()
    assert "21 photo(s) used" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: --images {many}: 21 photos, more than the 3-20 the method is made for; training "
                       "uses all 21 (each is drawn less often in the same steps); keep the 20 most varied to stay "
                       "within it"], captured.err
    assert captured.err.splitlines()[-1].startswith("error: model not found")


def test_train_warns_once_of_empty_caption_files_naming_them(tmp_path, capsys):
    photos = _plain_photos(tmp_path / "photos", 3)
    (photos / "p00.txt").write_text("a photo of {} on a table")
    (photos / "p01.txt").write_text("")
    (photos / "p02.png.txt").write_text(" \n\t\n")  # only whitespace: as empty
    assert main(["train", "--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student"),
                 "--images", str(photos), "--class-word", "mug", "--out", str(tmp_path / "c.safetensors")]) == 2
    captured = capsys.readouterr()
    assert "3 photo(s) used" in captured.out  # trained on all three, as before: the warning loses nothing
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: 2 caption file(s) in {str(photos)!r} are empty, so their photos train with the "
                       "prompt templates instead: p01.txt, p02.png.txt; write a caption in each (e.g. 'a photo of {} "
                       "on the grass') or delete them"], captured.err
