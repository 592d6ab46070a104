"""The `echodistill` command line: demo, train, inspect."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from echodistill.cli import main
from echodistill.concepts.bundle import ConceptBundle, bundle_summary
from echodistill.errors import ConfigError, EchoDistillError
from echodistill.miniworld.architecture import shipped_model
from echodistill.models import tiny
from echodistill.version import __version__


def _photo_folder(path):
    path.mkdir()
    for i in range(3):
        picture = Image.new("RGB", (80, 64), (30 * i, 120, 200))
        picture.paste((250, 240, 20), (10 + 5 * i, 10, 40 + 5 * i, 40))
        picture.save(path / f"photo{i}.png")
    return path


def test_train_writes_a_bundle_with_the_requested_settings(tiny_pair_folders, tmp_path, capsys):
    teacher, student = tiny_pair_folders
    out = tmp_path / "concept.safetensors"
    code = main(
        [
            "train",
            "--teacher",
            str(teacher),
            "--student",
            str(student),
            "--images",
            str(_photo_folder(tmp_path / "photos")),
            "--class-word",
            "cup",
            "--out",
            str(out),
            "--steps",
            "2",
            "--resolution",
            "64",
            "--set",
            "echo=false",
            "--set",
            "ms_swd_scales=2",
            "--set",
            "sample_every=2",
        ]
    )
    assert code == 0
    bundle = ConceptBundle.load(out)
    assert (bundle.step, bundle.class_word, bundle.config["echo"], bundle.config["ms_swd_scales"]) == (
        2,
        "cup",
        False,
        2,
    )
    assert (tmp_path / "concept-run" / "preview-000002.png").is_file()
    assert "concept bundle written" in capsys.readouterr().out


def test_train_reports_bad_input_without_a_traceback(tiny_pair_folders, tmp_path, capsys):
    teacher, student = tiny_pair_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "train",
            "--teacher",
            str(teacher),
            "--student",
            str(student),
            "--images",
            str(empty),
            "--class-word",
            "cup",
            "--out",
            str(tmp_path / "c.safetensors"),
            "--resolution",
            "64",
        ]
    )
    assert code == 2
    assert "error:" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--teacher",
            str(teacher),
            "--student",
            str(student),
            "--images",
            str(empty),
            "--class-word",
            "cup",
            "--out",
            str(tmp_path / "c.safetensors"),
            "--set",
            "nonsense",
        ]
    )
    assert code == 2
    assert "write key=value" in capsys.readouterr().err
    base = ["train", "--teacher", str(teacher), "--student", str(student), "--images", str(empty), "--class-word",
            "cup", "--out", str(tmp_path / "c.safetensors")]
    assert main([*base, "--resolution", "48"]) == 2  # the config's errors name this command's flags
    assert "error: --resolution 48 must be a multiple of 64" in capsys.readouterr().err
    assert main([*base, "--set", "lr_student=-1"]) == 2
    assert "error: --set lr_student=-1 must be positive" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_inspect_says_how_a_file_is_read(tiny_world, tmp_path, capsys):
    fam = tiny_world["families"]
    path = tiny.write_single_file(
        tiny_world["models"]["student"], tmp_path / "turbo.safetensors", fam["tiny-turbo"], "sgm", "openclip"
    )
    with pytest.raises(SystemExit):
        main(["inspect"])
    capsys.readouterr()
    assert main(["inspect", str(path), "--role", "student", "--family", str(fam["tiny-turbo"])]) == 0
    out = capsys.readouterr().out
    assert "family tiny-turbo" in out and "layout sgm" in out and "prediction epsilon" in out


def test_inspect_says_what_a_concept_bundle_holds(tmp_path, capsys):
    assert main(["smoke", "--out", str(tmp_path), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "concept.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "EchoDistill concept bundle" in out and "trained 1 steps" in out
    assert "one token row" in out and "on student and teacher" in out
    assert main(["inspect", "miniworld/student", "--role", "student"]) == 0  # the loaders' names work here too
    assert "diffusers folder with its own configs" in capsys.readouterr().out
    assert main(["inspect", "miniworld/teacher", "--family", "sdxl-base"]) == 2  # its configs say SD 2.x-like
    assert "is an SD 1.x / 2.x diffusers folder (its own configs say so), but family 'sdxl-base'" in capsys.readouterr().err
    broken = tmp_path / "broken_folder"
    shutil.copytree(shipped_model("miniworld/teacher"), broken)
    (broken / "unet" / "config.json").write_text("{ not json")
    assert main(["inspect", str(broken), "--family", "sd-turbo"]) == 2
    assert "unet/config.json is not valid JSON" in capsys.readouterr().err
    from echodistill.cli.train import FAMILY_HELP
    from echodistill.models.families import FAMILIES

    assert all(name in FAMILY_HELP for name in FAMILIES)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert bundle_summary(plain) is None and bundle_summary(tmp_path / "missing.safetensors") is None
    for header, problem in (("{not json", "not valid JSON"), ('["a"]', "not a JSON object"),
                            ('{"token": "<v*>", "families": "x"}', "'initializer' is missing")):
        damaged = tmp_path / "damaged.safetensors"
        save_file({"embedding": torch.zeros(4)}, str(damaged), metadata={"echodistill": header})
        assert main(["inspect", str(damaged)]) == 2 and main(["export", "--concept", str(damaged), "--out",
                                                               str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("error: damaged.safetensors") == 2 and problem in err, err


MAJOR, MINOR = map(int, __version__.split(".")[:2])
NEXT_MINOR, SAME_LINE = f"{MAJOR}.{MINOR + 1}.0", f"{MAJOR}.{MINOR}.99"  # while the major is 0, a minor may change bundles


def test_a_damaged_bundle_is_refused_alike_by_inspect_export_and_load(tmp_path, capsys):
    from safetensors import safe_open

    assert main(["smoke", "--out", str(tmp_path), "--steps", "1"]) == 0
    with safe_open(str(tmp_path / "concept.safetensors"), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    teacher_key = next(k for k in tensors if k.startswith("teacher."))
    nan = dict(tensors, embedding=torch.full_like(tensors["embedding"], float("nan")))
    cases = {  # name: (tensors, header, what the error says)
        "no_row": ({k: v for k, v in tensors.items() if k != "embedding"}, header, "no token row"),
        "lost_weight": ({k: v for k, v in tensors.items() if k != teacher_key}, header,
                        "teacher adapter tensor(s) where the header records"),
        "matrix_row": (dict(tensors, embedding=torch.zeros(3, 7)), header, "'embedding' has shape (3, 7)"),
        "nan_row": (nan, header, "'embedding' holds NaN or infinite values"),
        "whole_numbers": ({k: v.to(torch.int32) for k, v in tensors.items()}, header,  # named 3, counted after
                          f"holds torch.int32 values and {len(tensors) - 3} more tensor(s), not fp16, bf16 or fp32 floats"),
        "fp8_row": (dict(tensors, embedding=tensors["embedding"].to(torch.float8_e4m3fn)), header,
                    "'embedding' holds torch.float8_e4m3fn values, not fp16, bf16 or fp32 floats"),
        "stripped": (tensors, None, "has a concept bundle's tensors but no 'echodistill' header"),
    }
    for name, (content, metadata, problem) in cases.items():
        damaged = tmp_path / f"{name}.safetensors"
        save_file(content, str(damaged), metadata=metadata)
        assert main(["inspect", str(damaged)]) == 2
        assert main(["export", "--concept", str(damaged), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count(f"error: {name}.safetensors") == 2 and problem in err, err
        with pytest.raises(EchoDistillError, match=re.escape(problem)):
            ConceptBundle.load(damaged)
    assert not (tmp_path / "never").exists()
    edited = json.loads(header["echodistill"])
    for change, problem in (({"token": "a b"}, "the token 'a b' is not one word"), ({"step": -5}, "'step' is -5"),
                            ({"adapter_tensors": {"student": "14"}}, "'adapter_tensors' holds"),
                            ({"version": 99}, "'version' is a whole number, not a string"),
                            ({"step": True}, "'step' is true or false, not a whole number"),
                            ({"version": ""}, "the pack version '' is not one EchoDistill writes"),
                            ({"version": "v2.0.0"}, "the pack version 'v2.0.0' is not one EchoDistill writes"),
                            ({"adapter": "dora"}, "the adapter 'dora' is not one of 'custom_diffusion', 'lora'"),
                            ({"adapter": "lora"}, "the header says 'lora' but 'student."),
                            ({"version": "99.0"}, "saved by EchoDistill 99.0, newer than this pack"),
                            ({"version": NEXT_MINOR}, f"saved by EchoDistill {NEXT_MINOR}, newer than this pack")):
        damaged = tmp_path / "edited.safetensors"
        save_file(tensors, str(damaged), metadata={"echodistill": json.dumps({**edited, **change})})
        assert main(["inspect", str(damaged)]) == 2 and problem in capsys.readouterr().err
        with pytest.raises(EchoDistillError, match=re.escape(problem)):
            ConceptBundle.load(damaged)
    for readable in (SAME_LINE, "0.0.4", "unknown"):  # the same format line, an older one, a bundle from before versions
        save_file(tensors, str(damaged), metadata={"echodistill": json.dumps({**edited, "version": readable})})
        assert ConceptBundle.load(damaged).version == readable


def test_smoke_runs_end_to_end_on_a_tiny_random_pair(tmp_path, capsys):
    assert main(["smoke", "--out", str(tmp_path), "--steps", "2"]) == 0
    assert ConceptBundle.load(tmp_path / "concept.safetensors").step == 2
    out = capsys.readouterr().out  # a kept bundle is named where it is
    assert f"concept bundle written: {tmp_path / 'concept.safetensors'} (token '<v*>', 2 steps)" in out, out


def test_smoke_leaves_no_temporary_folder_behind_and_names_no_path_in_it(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["smoke", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) not in out, out  # the folder is gone when the line is read: a path into it would mislead
    assert ("tiny models, concept and previews were written to a temporary folder, now removed (--out DIR keeps "
            "them)\nsmoke check passed in ") in out, out
    assert list(tmp_path.iterdir()) == []


def test_sample_defaults_to_the_models_native_size_and_warns_far_from_it(tmp_path, capsys):
    from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR

    models = ["--teacher", str(TEACHER_DIR), "--student", str(STUDENT_DIR)]
    prompt = ["--prompt", "a large red circle on the left, on a blue striped background"]
    assert main(["sample", *models, *prompt, "--out", str(tmp_path / "native")]) == 0
    with Image.open(next((tmp_path / "native").glob("*.png"))) as picture:
        assert picture.size == (64, 64)  # the mini world's native size, not 512
    assert "64x64" in capsys.readouterr().out
    assert main(["sample", *models, *prompt, "--width", "512", "--height", "512", "--out", str(tmp_path / "big")]) == 0
    err = capsys.readouterr().err
    assert "warning: --width 512 x --height 512 is far from the 64 x 64" in err and "pass --width 64" in err
    assert main(["sample", *models, *prompt, "--width", "60", "--out", str(tmp_path / "odd")]) == 2
    assert "error: --width 60 must be a positive multiple of" in capsys.readouterr().err


def test_train_reads_miniworld_subjects_as_the_loaders_do(tmp_path):
    from echodistill.cli.train import concept_images
    from echodistill.miniworld.procedural import VALIDATION_SEEDS

    named = concept_images("miniworld/checker_diamond", 64)
    assert len(named) == 5 and named[0].caption == "a {} on a plain red background"  # the background only
    assert len(concept_images(f"miniworld/procedural_{VALIDATION_SEEDS.start}", 64)) == 5
    with pytest.raises(ConfigError, match="--images 'miniworld/unicorn': unknown subject"):
        concept_images("miniworld/unicorn", 64)


def test_sample_export_and_eval_commands(tiny_pair_folders, tmp_path, capsys):
    import json

    from PIL import Image
    from safetensors import safe_open
    from transformers import CLIPConfig, CLIPModel

    teacher, student = tiny_pair_folders
    concept = tmp_path / "concept.safetensors"
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--images",
                 str(_photo_folder(tmp_path / "photos")), "--class-word", "cup", "--out", str(concept),
                 "--steps", "1", "--resolution", "64", "--set", "echo=false", "--set", "sample_every=0"]) == 0
    models = ["--teacher", str(teacher), "--student", str(student)]
    assert main(["sample", *models, "--concept", str(concept), "--prompt", "a <v*> cup on a table", "--count", "2",
                 "--seed", "5", "--width", "64", "--height", "64", "--out", str(tmp_path / "student")]) == 0
    pngs = sorted((tmp_path / "student").glob("*.png"))
    assert [p.name for p in pngs] == ["student-000-seed5.png", "student-001-seed6.png"]
    with Image.open(pngs[1]) as picture:
        record = json.loads(picture.info["echodistill"])
        assert picture.size == (64, 64)
    assert (record["prompt"], record["seed"], record["steps"], record["concept"]["token"]) == (
        "a <v*> cup on a table", 6, 1, "<v*>")
    assert main(["sample", *models, "--prompt", "a cup", "--seed", "9", "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "student")]) == 0  # into the same folder: after the images there
    assert sorted(p.name for p in (tmp_path / "student").glob("*.png")) == [
        "student-000-seed5.png", "student-001-seed6.png", "student-002-seed9.png"]
    with Image.open(pngs[0]) as picture:
        assert json.loads(picture.info["echodistill"])["prompt"] == "a <v*> cup on a table"  # not replaced
    assert main(["teacher-sample", *models, "--concept", str(concept), "--steps", "3", "--width", "64",
                 "--height", "64", "--out", str(tmp_path / "teacher")]) == 0
    assert len(list((tmp_path / "teacher").glob("teacher-*.png"))) == 1

    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "loras"),
                 "--embedding-out", str(tmp_path / "embeddings"), "--name", "cup"]) == 0
    with safe_open(str(tmp_path / "loras" / "cup.safetensors"), "pt") as lora:
        # The default export: lora_up / lora_down factors with one alpha, which every client loads.
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
                   for k in lora.keys())
    assert (tmp_path / "embeddings" / "cup.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "loras"), "--name", "cup"]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    # refused after the output folder was made: the command leaves no empty folder behind, and speaks in flags
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "new" / "loras"), "--rank", "0"]) == 2
    assert "error: --rank 0 must be a positive integer (or leave it out" in capsys.readouterr().err
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "new"), "--mode", "diff", "--rank", "4"]) == 2
    assert "error: --rank 4 applies to --mode lowrank only: diff patches are exact" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["sample", *models, "--prompt", "a cup", "--width", "100", "--out", str(tmp_path / "refused" / "pngs")]) == 2
    assert "--width 100 must be a positive multiple" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    (tmp_path / "kept").mkdir()
    assert main(["sample", *models, "--prompt", "a cup", "--width", "100", "--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()  # a folder the user had stays, empty or not

    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                             "num_attention_heads": 4, "vocab_size": 49408},
                                vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                               "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    capsys.readouterr()
    assert main(["eval", "--images", str(tmp_path / "student"), "--references", str(tmp_path / "photos"),
                 "--class-word", "cup"]) == 2
    err = capsys.readouterr().err
    assert "pass --clip (a CLIP ViT-L/14-336" in err and "--dino (a DINOv2" in err and "_path" not in err
    assert main(["eval", "--images", str(tmp_path / "student"), "--references", str(tmp_path / "photos"),
                 "--class-word", "cup", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "scores.json")]) == 0
    err = capsys.readouterr().err  # the generated images are pictures, the references photos
    assert "images: 3 picture(s) used" in err and "references: 3 photo(s) used" in err
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["images"] == 3 and scores["references"] == 3
    assert 0 <= scores["clip_i"] <= 1 and 0 <= scores["clip_t"] <= 1 and "dino" not in scores
    again = ["eval", "--images", str(tmp_path / "student"), "--references", str(tmp_path / "photos"), "--class-word",
             "cup", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "scores.json")]
    (tmp_path / "scores.json").write_text('{"kept": true}')
    assert main(again) == 2  # earlier scores are kept unless --overwrite
    assert "holds earlier scores: pick another --out, or pass --overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "scores.json").read_text()) == {"kept": True}
    assert main([*again, "--overwrite"]) == 0 and json.loads((tmp_path / "scores.json").read_text())["images"] == 3


def test_train_on_a_shipped_subject_at_the_models_native_size(tmp_path):
    from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR

    out = tmp_path / "diamond.safetensors"
    assert main(["train", "--teacher", str(TEACHER_DIR), "--student", str(STUDENT_DIR), "--images",
                 "miniworld/checker_diamond", "--class-word", "diamond", "--out", str(out), "--steps", "1",
                 "--set", "echo=false", "--set", "sample_every=0"]) == 0
    assert ConceptBundle.load(out).config["resolution"] == 64  # the mini world's size, not the preset's 512


def test_train_lite_on_an_sdxl_pair_uses_sdxls_lite(tiny_sdxl_folders, tmp_path):
    """SDXL's lite trains LoRA K/V (training.config.LINE_PRESETS); a --set adapter still wins."""
    teacher, student = tiny_sdxl_folders
    photos = _photo_folder(tmp_path / "photos")
    for name, extra, adapter in (("lite", [], "lora"), ("chosen", ["--set", "adapter=custom_diffusion"],
                                                         "custom_diffusion")):
        out = tmp_path / f"{name}.safetensors"
        code = main(["train", "--teacher", str(teacher), "--student", str(student), "--images", str(photos),
                     "--class-word", "cup", "--out", str(out), "--steps", "1", "--resolution", "64", "--preset",
                     "lite", "--set", "echo=false", "--set", "sample_every=0", *extra])
        assert code == 0
        bundle = ConceptBundle.load(out)
        assert bundle.is_sdxl and bundle.adapter == adapter and bundle.config["batch_size"] == 1


def test_train_takes_the_miniworld_preset_a_manifest_takes_and_names_it_among_the_valid_ones(tmp_path, capsys):
    from echodistill.concepts.bundle import ConceptBundle
    from echodistill.jobs.demo import demo_config

    out = tmp_path / "w.safetensors"
    train = ["train", "--teacher", "miniworld/teacher", "--student", "miniworld/student", "--images",
             "miniworld/window", "--out", str(out)]
    assert main([*train, "--preset", "miniworld", "--steps", "2"]) == 0
    expected = demo_config("window", 2, 0).to_dict()  # the demo's recipe, as `preset = "miniworld"` in a manifest
    assert ConceptBundle.load(out).config == {**expected, "token": "<v*>"}
    capsys.readouterr()
    assert main([*train, "--preset", "bogus"]) == 2
    assert capsys.readouterr().err.strip() == "error: --preset bogus: give one of paper, balanced, lite, miniworld"
    # A finished run is never replaced by a new one: --resume it, or --overwrite
    run = tmp_path / "w-run" / "checkpoint.pt"
    assert main([*train, "--preset", "miniworld", "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run} holds an earlier run of this concept: continue it with "
                                               f"--resume {run} (ask for more --steps to train it further), or pass "
                                               "--overwrite to train anew")
    run.unlink()
    assert main([*train, "--preset", "miniworld", "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {out} already exists: pick another name, or pass "
                                               "--overwrite to train anew and replace it")
    before = out.read_bytes()
    assert main([*train, "--preset", "miniworld", "--steps", "1", "--overwrite"]) == 0
    assert ConceptBundle.load(out).step == 1 and out.read_bytes() != before
    capsys.readouterr()
    assert main([*train[:5], "--images", "miniworld/nosuch", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --images miniworld/nosuch: unknown subject 'nosuch'")


# --- where each training config value comes from, and how messages name it --------------------------

WINDOW = ["train", "--teacher", "miniworld/teacher", "--student", "miniworld/student", "--images", "miniworld/window"]


def _config_of(argv):
    """The TrainConfig `train` would run with for `argv` (nothing loads or trains)."""
    from echodistill.cli import build_parser
    from echodistill.cli.train import _train_config

    return _train_config(build_parser().parse_args(argv))


def test_a_set_value_of_the_wrong_type_is_shown_as_written(tmp_path, capsys):
    assert main([*WINDOW, "--out", str(tmp_path / "w.safetensors"), "--set", "steps=true"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --set steps=True must be a whole number, at least 1, e.g. "
                                               "--set steps=1000")


def test_a_config_file_without_a_resolution_trains_at_the_students_native_size(tmp_path):
    from echodistill.concepts.bundle import ConceptBundle

    config = tmp_path / "run.json"
    config.write_text('{"steps": 1, "echo": false}')
    out = tmp_path / "w.safetensors"
    assert main([*WINDOW, "--out", str(out), "--config", str(config)]) == 0
    assert ConceptBundle.load(out).config["resolution"] == 64  # the mini world's, not TrainConfig's 512
    config.write_text('{"steps": 1, "echo": false, "resolution": 128}')  # a size the file chose stands
    assert main([*WINDOW, "--out", str(out), "--config", str(config), "--overwrite"]) == 0
    assert ConceptBundle.load(out).config["resolution"] == 128


def test_set_gives_a_field_that_has_its_own_flag_and_a_disagreement_is_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path / "w.safetensors")]
    config = _config_of([*WINDOW, *out, "--set", "steps=7", "--set", "token=<sks>", "--set", "class_word=ring",
                         "--set", "seed=5", "--set", "batch_size=1", "--set", "resolution=128"])
    # --set wins over the preset, --token's default and the subject's class word; echo rounds follow its steps
    assert (config.steps, config.token, config.class_word, config.seed, config.batch_size, config.resolution) == (
        7, "<sks>", "ring", 5, 1, 128)
    assert config.echo_start == 3
    same = _config_of([*WINDOW, *out, "--steps", "7", "--set", "steps=7", "--token", "<t>", "--set", "token=<t>"])
    assert (same.steps, same.token) == (7, "<t>")  # one value given twice is one value
    for flag, value, assignment in (("--steps", "0", "steps=3"), ("--token", "a", "token=b"),
                                    ("--class-word", "cup", "class_word=dog"), ("--seed", "1", "seed=2"),
                                    ("--batch-size", "1", "batch_size=2"), ("--resolution", "64", "resolution=128")):
        field = assignment.partition("=")[0]
        assert main([*WINDOW, *out, flag, value, "--set", assignment]) == 2
        assert capsys.readouterr().err == (f"error: {flag} {value} and --set {assignment}: two values for {field}; "
                                           f"give it once, with {flag}\n")
    assert main([*WINDOW, *out, "--set", "steps=3", "--set", "steps=4"]) == 2
    assert capsys.readouterr().err == "error: --set steps=3 and --set steps=4: two values for steps; give it once\n"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "0", "--set", "steps=3"]) == 2
    assert capsys.readouterr().err == ("error: --steps 0 and --set steps=3: two values for steps; give it once, with "
                                       "--steps\n")
    assert main([*WINDOW, *out, "--set", "stepz=3"]) == 2  # the likely fix, not ~50 names burying it
    assert capsys.readouterr().err == ("error: unknown config field(s): stepz (--set stepz=3; did you mean steps?); "
                                       'valid fields: see the options table in README.md ("Training a concept")\n')
    assert main([*WINDOW, *out, "--set", "stepz=3", "--set", "zzzz=1"]) == 2  # one resembling nothing: every field
    assert capsys.readouterr().err.startswith("error: unknown config field(s): stepz (--set stepz=3; did you mean "
                                              "steps?), zzzz (--set zzzz=1); valid fields: steps, batch_size, ")
    assert main([*WINDOW, *out, "--backbone", "dino=/models/dino"]) == 2  # not "--set discriminators=..."
    assert capsys.readouterr().err.startswith("error: --backbone dino=/models/dino: 'dino' is no discriminator; "
                                              "name one of teacher_features, dino_vits16")
    assert not list(tmp_path.iterdir())


def test_a_config_file_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows Notepad starts UTF-8 with a BOM, which json refuses: the file is read as the text it marks."""
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"steps": 30, "token": "<sks>", "seed": 3, "echo": False}),
                           encoding="utf-8-sig")
    assert config_file.read_bytes().startswith(b"\xef\xbb\xbf")
    config = _config_of([*WINDOW, "--out", str(tmp_path / "w.safetensors"), "--config", str(config_file)])
    assert (config.steps, config.token, config.seed) == (30, "<sks>", 3)


def test_a_config_files_values_are_named_as_its_keys_and_the_flags_as_typed(tmp_path, capsys):
    photos = _photo_folder(tmp_path / "photos")
    config_file = tmp_path / "run.json"
    base = ["train", "--teacher", "miniworld/teacher", "--student", "miniworld/student", "--images", str(photos),
            "--out", str(tmp_path / "c.safetensors"), "--config", str(config_file)]
    config_file.write_text(json.dumps({"steps": 0, "lr_student": "a", "class_word": "mug"}))
    assert main(base) == 2
    assert capsys.readouterr().err == (
        "error: 2 config problems:\n"  # the type error hides no range problem, and neither claims a flag
        f"  - lr_student='a' must be a number (lr_student from --config {config_file})\n"
        f"  - steps=0 must be at least 1 (steps from --config {config_file})\n")
    config_file.write_text(json.dumps({"steps": 5, "lr_student": -1, "lr_teacher": 0.5, "class_word": "mug"}))
    assert main([*base, "--steps", "0", "--set", "lr_teacher=2"]) == 2
    assert capsys.readouterr().err == (
        "error: 3 config problems:\n"
        "  - --steps 0 must be at least 1\n"
        f"  - lr_student=-1 must be positive (lr_student from --config {config_file})\n"
        "  - --set lr_teacher=2 must be at most 1 (AdamW moves each weight by about the rate per step)\n")
    config_file.write_text(json.dumps({"steps": 5, "stepz": 3}))
    assert main(base) == 2
    err = capsys.readouterr().err  # with every other problem, and no caveat about a config refused anyway
    assert err.startswith(f"error: 2 config problems:\n  - unknown config field(s): stepz (in --config {config_file}; "
                          "did you mean steps?)"), err
    assert err.endswith("\n  - --class-word is required for a photo folder: the subject's class, e.g. --class-word "
                        "dog\n"), err
    # the file's values stand (its token and class word too) unless a flag or --set changes them
    config_file.write_text(json.dumps({"steps": 30, "token": "<sks>", "class_word": "mug", "seed": 3, "echo": False}))
    config = _config_of(base)
    assert (config.steps, config.token, config.class_word, config.seed) == (30, "<sks>", "mug", 3)
    config = _config_of([*base, "--steps", "40", "--token", "<t>", "--set", "seed=4"])
    assert (config.steps, config.token, config.class_word, config.seed) == (40, "<t>", "mug", 4)
    assert main([*base, "--preset", "lite"]) == 2  # a preset would be ignored: refused, not dropped in silence
    assert capsys.readouterr().err == (f"error: --config {config_file} and --preset lite: give one of them (change "
                                       "the file's values with the flags or --set)\n")


def test_the_echo_warning_prints_once_naming_only_what_was_given(tmp_path, capsys):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"steps": 100, "class_word": "square"}))
    missing = ["--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student")]
    train = ["train", *missing, "--images", "miniworld/window", "--out", str(tmp_path / "c.safetensors")]
    assert main([*train, "--config", str(config_file)]) == 2  # no teacher: stops after the config and the photos
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: echo=true but echo_start=500 >= steps=100: this run never echoes; use "
                        f"echo_start=50 (preset() scales it to steps) or echo=false (steps from --config "
                        f"{config_file})"]
    assert main([*train, "--preset", "miniworld", "--steps", "1", "--set", "echo=false"]) == 2
    assert "warning:" not in capsys.readouterr().err  # the recipe's own config before echo=false warns nothing
    out = tmp_path / "w.safetensors"
    assert main([*WINDOW, "--out", str(out), "--set", "steps=1", "--set", "sample_every=0"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    # built again at the student's native size: still one warning, and no "--set echo" the user never wrote
    assert warnings == ["warning: echo=true but echo_start=1 >= --set steps=1: this run never echoes; train 2 or "
                        "more steps, or pass echo=false"], warnings
    assert ConceptBundle.load(out).step == 1


def test_inspect_refuses_what_export_would_refuse_against_the_stored_unet_configs(tmp_path, capsys):
    from safetensors import safe_open

    assert main(["smoke", "--out", str(tmp_path), "--steps", "1"]) == 0
    capsys.readouterr()
    with safe_open(str(tmp_path / "concept.safetensors"), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    deltas = [k for k in tensors if k.endswith(".delta")]
    cases = {"squares": ({k: torch.zeros(7, 7) if k in deltas else v for k, v in tensors.items()},
                         f"(and {sum(k.startswith('student.') for k in deltas) - 1} more module(s)): ΔW has shape (7, 7)"),
             "wide_row": (dict(tensors, embedding=torch.zeros(64)), "embedding row is 64 wide")}
    for name, (content, problem) in cases.items():
        save_file(content, str(tmp_path / f"{name}.safetensors"), metadata=header)
        assert main(["inspect", str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {name}.safetensors: ") and problem in err and err.count("\n") == 1, err
        assert main(["sample", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student.safetensors"),
                     "--student-family", str(tmp_path / "families" / "tiny-turbo"), "--concept",
                     str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert f"error: {name}.safetensors: " in err and problem in err, err  # the file named, as inspect names it
    assert main(["inspect", str(tmp_path / "concept.safetensors")]) == 0
    assert not (tmp_path / "never").exists()
