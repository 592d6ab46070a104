"""The `echodistill` command line: demo, train, inspect."""

from __future__ import annotations

import pytest
from PIL import Image

from echodistill.cli import main
from echodistill.concepts.bundle import ConceptBundle
from echodistill.models import tiny


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


def test_smoke_runs_end_to_end_on_a_tiny_random_pair(tmp_path, capsys):
    assert main(["smoke", "--out", str(tmp_path), "--steps", "2"]) == 0
    assert ConceptBundle.load(tmp_path / "concept.safetensors").step == 2
    assert "concept bundle written" in capsys.readouterr().out


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
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "loras"), "--name", "cup"]) == 2

    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                             "num_attention_heads": 4, "vocab_size": 49408},
                                vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                               "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    capsys.readouterr()
    assert main(["eval", "--images", str(tmp_path / "student"), "--references", str(tmp_path / "photos"),
                 "--class-word", "cup", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["images"] == 2 and scores["references"] == 3
    assert 0 <= scores["clip_i"] <= 1 and 0 <= scores["clip_t"] <= 1 and "dino" not in scores
