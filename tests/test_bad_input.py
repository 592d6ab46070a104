"""Bad input ends in one `error:` line naming what to fix (exit 2), before anything heavy loads or allocates."""

from __future__ import annotations

import json

import pytest
import torch

from echodistill.cli import main
from echodistill.errors import EchoDistillError
from echodistill.training.checkpointing import TrainingCheckpoint
from echodistill.training.config import TrainConfig

MODELS = ["--teacher", "miniworld/teacher", "--student", "miniworld/student"]
TRAIN = ["train", *MODELS, "--images", "miniworld/window", "--class-word", "square", "--steps", "2"]


@pytest.mark.parametrize("arguments, message", [
    (["--set", "lr_student=abc", "--out", "c.safetensors"], "lr_student='abc' must be a number"),
    (["--set", "batch_size=1.5", "--out", "c.safetensors"], "1.5 must be a whole number"),
    (["--set", "echo=maybe", "--out", "c.safetensors"], "echo='maybe' must be true or false"),
    (["--set", "discriminators=foo", "--out", "c.safetensors"], "discriminators='foo' must be a list"),
    (["--out", "bundle"], "--out bundle: give the concept bundle's file name, ending in .safetensors"),
    (["--device", "banana", "--out", "c.safetensors"], "--device 'banana' is not a device"),
    (["--device", "cuda:7", "--out", "c.safetensors"], "--device 'cuda:7' is not available here"),
])
def test_train_refuses_bad_values_in_one_line(arguments, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.glob("*.safetensors"))  # nothing trained, nothing written


def test_a_config_file_that_is_not_json_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("steps: 3")
    assert main([*TRAIN, "--config", "bad.json", "--out", "c.safetensors"]) == 2
    assert "the config is not JSON" in capsys.readouterr().err
    (tmp_path / "latin.json").write_bytes('{"class_word": "caf\u00e9"}'.encode("latin-1"))
    assert main([*TRAIN, "--config", "latin.json", "--out", "c.safetensors"]) == 2
    assert "--config latin.json is not UTF-8 text" in capsys.readouterr().err
    assert main([*TRAIN, "--config", "nope.json", "--out", "c.safetensors"]) == 2
    assert "--config nope.json cannot be read" in capsys.readouterr().err
    (tmp_path / "twice.json").write_text('{"steps": 3, "class_word": "dog", "steps": 30}')  # json keeps the last
    assert main([*TRAIN, "--config", "twice.json", "--out", "c.safetensors"]) == 2
    assert "the config gives steps twice; give each field once" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("arguments, message", [
    (["--count", "100000000000"], "--count 100000000000: give 1 to 10000"),
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: give a seed from 0"),
    (["--width", "640000"], "--width 640000: give 1 to 4096 pixels"),
    (["--steps", "9"], "--steps 9: give 1 to 4"),
    (["--guidance", "nan"], "--guidance nan: give a finite scale"),
])
def test_sample_refuses_numbers_no_model_can_use_before_loading(arguments, message, tmp_path, capsys):
    assert main(["sample", *MODELS, "--prompt", "a red circle", "--out", str(tmp_path / "out"), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_binary_prompts_file_is_refused(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(bytes(range(128, 256)))
    assert main(["sample", *MODELS, "--prompts-file", str(tmp_path / "prompts.txt"), "--out", str(tmp_path)]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err


def test_a_prompts_file_saved_with_a_utf8_byte_order_mark_keeps_its_first_prompt_as_written(tmp_path):
    import argparse

    from echodistill.cli.after_training import _prompts

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n", encoding="utf-8-sig")  # as Notepad saves
    args = argparse.Namespace(prompt=None, prompts_file=str(tmp_path / "prompts.txt"), concept=None)
    assert _prompts(args) == ["a red circle", "a blue square"]


def test_a_file_that_is_not_a_checkpoint_is_refused_as_one(tmp_path):
    torch.save({"embedding": torch.zeros(3), "token": "<v*>"}, tmp_path / "concept.pt")
    with pytest.raises(EchoDistillError, match="is not a training checkpoint"):
        TrainingCheckpoint.load(tmp_path / "concept.pt")


def test_a_broken_fleet_state_file_is_named(tmp_path, capsys):
    (tmp_path / "fleet-state.json").write_text("{bad")
    assert main(["fleet", "status", "--out", str(tmp_path)]) == 2
    assert "is not a fleet state file" in capsys.readouterr().err


def test_config_types_are_checked_before_any_comparison():
    assert TrainConfig(lr_student=1).lr_student == 1  # an int where a float goes is a number
    with pytest.raises(EchoDistillError, match="steps=True must be a whole number"):
        TrainConfig(steps=True)


def test_class_word_comes_from_a_mini_world_subject_and_is_required_for_a_folder(tmp_path, capsys):
    from echodistill.cli.train import _subject_class_word

    assert _subject_class_word("miniworld/smiley") == "circle"
    assert _subject_class_word("miniworld/procedural_3000000") in ("circle", "square", "triangle", "diamond", "star",
                                                                   "ring")
    assert main(["train", *MODELS, "--images", str(tmp_path), "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "--class-word is required for a photo folder" in capsys.readouterr().err


def test_the_shipped_pair_is_named_as_the_loaders_name_it_and_nothing_else(tmp_path, capsys):
    from echodistill.miniworld.architecture import STUDENT_DIR, TEACHER_DIR, shipped_model

    assert (shipped_model("miniworld/teacher"), shipped_model("miniworld/student")) == (TEACHER_DIR, STUDENT_DIR)
    assert shipped_model(str(tmp_path)) is None  # a path stays a path
    assert main(["sample", "--teacher", "miniworld/foo", "--student", "miniworld/student", "--prompt", "x",
                 "--out", str(tmp_path / "out")]) == 2
    assert "'miniworld/foo' is not a shipped model; shipped: miniworld/student, miniworld/teacher" in capsys.readouterr().err


def _damage(folder, case):
    """A copy of a diffusers folder damaged one way; returns what the loader and `inspect` must name."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = next((folder / "unet").glob("*.safetensors"))
    if case == "truncated unet":
        weights.write_bytes(weights.read_bytes()[:2000])
        return "is not a readable safetensors file (not a safetensors file, or cut short within its header"
    if case == "no unet weights":
        weights.unlink()
        return "no weights in"
    if case == "unet config {}":
        (folder / "unet" / "config.json").write_text("{}")
        return "lacks block_out_channels, cross_attention_dim: not a UNet config"
    if case == "unet config list":
        (folder / "unet" / "config.json").write_text("[1, 2]")
        return "holds a JSON list, not a config object"
    if case == "model_index garbage":
        (folder / "model_index.json").write_text("garbage{")
        return "model_index.json is not valid JSON"
    if case == "scheduler values":
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "prediction_type": "eps", "num_train_timesteps": 0}))
        return ("scheduler_config.json has prediction_type 'eps' (known: epsilon, v_prediction, sample); "
                "num_train_timesteps 0 (a whole number of at least 1): restore the file")
    if case == "integer weights":
        save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, str(weights))
        return "holds torch.int32 values where a weight is a floating-point number"
    if case == "junk .bin":
        weights.unlink()
        (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04junk" * 40)
        return "is not a readable PyTorch checkpoint"
    if case == "missing tensor":
        save_file({k: v for k, v in load_file(weights).items() if k != "conv_out.weight"}, str(weights))
        return "1 missing, e.g. ['conv_out.weight']"
    if case == "no text encoder":
        shutil.rmtree(folder / "text_encoder")
        return "text_encoder"
    raise ValueError(case)


DAMAGES = ["truncated unet", "no unet weights", "unet config {}", "unet config list", "model_index garbage",
           "scheduler values", "integer weights", "junk .bin", "no text encoder"]


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_teacher_is_refused_in_one_line_by_sample(case, tiny_pair_folders, tmp_path, capsys):
    import shutil

    teacher = shutil.copytree(tiny_pair_folders[0], tmp_path / "teacher")
    message = _damage(teacher, case)
    assert main(["sample", "--teacher", str(teacher), "--student", str(tiny_pair_folders[1]), "--prompt", "x",
                 "--width", "64", "--height", "64", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["truncated unet", "no unet weights", "unet config list", "junk .bin",
                                  "no text encoder", "model_index garbage", "scheduler values"])
def test_inspect_opens_every_part_the_role_reads(case, tiny_pair_folders, tmp_path, capsys):
    """A folder whose configs read but whose weights do not is refused by `inspect`, as loading would refuse it."""
    import shutil

    teacher = shutil.copytree(tiny_pair_folders[0], tmp_path / "teacher")
    message = _damage(teacher, case)
    assert main(["inspect", str(teacher)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main(["inspect", str(tiny_pair_folders[0])]) == 0  # the undamaged folder reads


@pytest.mark.parametrize("case", ["missing tensor", "integer weights"])
def test_inspect_load_finds_what_only_loading_the_tensors_shows(case, tiny_pair_folders, tmp_path, capsys):
    """Headers that read but tensors that do not fit: `inspect` alone passes, `inspect --load` refuses in one line."""
    import shutil

    teacher = shutil.copytree(tiny_pair_folders[0], tmp_path / "teacher")
    message = _damage(teacher, case)
    assert main(["inspect", str(teacher)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(teacher), "--load"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main(["inspect", str(tiny_pair_folders[0]), "--load"]) == 0
    out = capsys.readouterr().out
    assert "loads as a teacher: unet " in out and "text_encoder " in out and "M parameters" in out
    assert main(["inspect", str(tiny_pair_folders[1]), "--role", "student", "--load"]) == 0
    student = capsys.readouterr().out
    assert "loads as a student: unet " in student and ", vae " in student and "text_encoder" not in student


@pytest.mark.parametrize("argv, message", [
    ([*TRAIN[:-2], "--steps", "nan"], "--steps nan: give a whole number of training steps, e.g. --steps 400"),
    ([*TRAIN, "--seed", "inf"], "--seed inf: give a whole number from 0, e.g. --seed 42"),
    ([*TRAIN, "--resolution", "1e3"], "--resolution 1e3: give a whole number of pixels, a multiple of 64, e.g. "
                                      "--resolution 512"),
    ([*TRAIN, "--batch-size", "1.5"], "--batch-size 1.5: give a whole number of images per iteration, e.g. "
                                      "--batch-size 2"),
    (["demo", "--steps", "nan"], "--steps nan: give a whole number of training steps, e.g. --steps 400"),
    (["bench", "quality", "--steps", "4_00"], "--steps 4_00: give a whole number of training steps, e.g. --steps 400"),
    (["demo", "--seed", "\u0663"], "--seed \u0663: give a whole number from 0, e.g. --seed 0"),  # Arabic-Indic 3
    (["bench", "quality", "--images-per-prompt", "\uff14"],
     "--images-per-prompt \uff14: give a whole number of images, e.g. --images-per-prompt 4"),  # full-width 4
    (["bench", "lr-sweep", "--token-rates", "0_001"],
     "--token-rates 0_001: give rates above 0 and at most 1, e.g. --token-rates 0.001"),
    # a list option given twice would keep the last list alone
    (["bench", "quality", "--seeds", "0", "--seeds", "1"],
     "--seeds given twice: list every value after one --seeds, e.g. --seeds A B"),
    (["smoke", "--threads", "1e9"], "--threads 1e9: give a whole number of CPU threads, e.g. --threads 1"),
    (["sample", *MODELS, "--prompt", "x", "--out", "o", "--count", "inf"],
     "--count inf: give a whole number of images per prompt, e.g. --count 4"),
    (["sample", *MODELS, "--prompt", "x", "--out", "o", "--guidance", "high"],
     "--guidance high: give a guidance scale, e.g. --guidance 7.5"),
    (["bench", "sample", "--batch", "1", "nan"], "--batch nan: give whole numbers of images, e.g. --batch 16"),
    (["fleet", "run", "fleet.toml", "--out", "o", "--workers", "two"],
     "--workers two: give a whole number of worker slots, e.g. --workers 2"),
    (["export", "--concept", "c.safetensors", "--out", "o", "--rank", "4.5"],
     "--rank 4.5: give a whole-number rank, e.g. --rank 16"),
])
def test_a_number_flag_given_no_number_is_refused_in_one_line(argv, message, capsys):
    """nan, inf, 1.5 or a word where a whole number goes: one `error:` line naming the flag and an example (no
    usage dump, no traceback), as the commands' own errors read."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("argv, message", [
    ([*TRAIN[:-2], "--out", "c.safetensors", "--steps", "-1"], "error: --steps -1 must be at least 1"),
    ([*TRAIN, "--out", "c.safetensors", "--resolution", "8192"],
     "error: --resolution 8192 must be at most 4096 pixels"),
    ([*TRAIN, "--out", "c.safetensors", "--batch-size", "100000"], "error: --batch-size 100000 must be at most 256"),
    ([*TRAIN, "--out", "c.safetensors", "--seed", "-1"], "error: --seed -1 must not be negative"),
    (["smoke", "--steps", "0"], "error: --steps 0: give 1 to 1,000 training steps"),
    (["smoke", "--threads", "100000"], "error: --threads 100000: give 1 to 1,024 CPU threads"),
    (["demo", "--threads", "100000", "--out", "demo"], "error: --threads 100000: give 1 to 1,024 CPU threads"),
    (["bench", "sample", "--batch", "1", "0"], "error: --batch 0: give 1 to 1,024 images per call"),
    (["bench", "quality", "--images-per-prompt", "101"], "error: --images-per-prompt 101: give 1 to 100 images"),
    (["bench", "lr-sweep", "--factors", "1", "nan"], "error: --factors nan: give multiples of the published rates"),
    (["bench", "lr-sweep", "--concept", "dog"], "error: --concept: unknown subject 'dog': use a shipped one"),
    (["bench", "lr-sweep", "--factors", "1", "--token-rates", "1e-3"],
     "error: give --factors (the first stage) or --token-rates (the second), not both"),
    (["bench", "lr-sweep", "--token-rates", "2"], "error: --token-rates 2: give rates above 0 and at most 1"),
    (["bench", "lr-sweep", "--token-rates", "1e-3", "--families", "textual_inversion"],
     "error: --families textual_inversion: give one or more of echodistill, custom_diffusion (the families"),
    (["bench", "lr-sweep", "--lr-scale", "echodistill=3"], "error: --lr-scale sets the factors --token-rates trains"),
    (["bench", "lr-sweep", "--token-rates", "1e-3", "--lr-scale", "echodistill=0"],
     "error: --lr-scale 'echodistill=0': write FAMILY=FACTOR with a factor > 0"),
    (["bench", "quality", "--token-lr", "textual_inversion=1e-3"],
     "error: --token-lr 'textual_inversion=1e-3': write FAMILY=RATE with a rate from 0"),
    (["bench", "quality", "--token-lr", "echodistill=0_001"], "error: --token-lr 'echodistill=0_001': write FAMILY="),
    (["bench", "quality", "--token-lr", "echodistill=1e-3", "echodistill=2e-3"],
     "error: --token-lr: two values for echodistill; give each family once"),
    (["bench", "lr-sweep", "--token-rates", "1e-3", "--lr-scale", "dreambooth_lora=2"],
     "error: --lr-scale dreambooth_lora=2: only the swept families' factors are used"),
    (["bench", "lr-sweep", "--families", "echodistill", "echodistill"],
     "error: --families echodistill echodistill: name each family once"),
    (["bench", "lr-sweep", "--concept", "2000001"], "error: --concept: procedural_2000001 is no fresh subject"),
    (["bench", "quality", "--concepts", "smiley", "dog"], "error: --concepts: unknown subject 'dog'"),
    (["bench", "lr-sweep", "--models", "no_such_folder"], "error: --models no_such_folder: no_such_folder/teacher is "
                                                          "not a folder"),
    (["fleet", "run", "fleet.toml", "--out", "o", "--workers", "5000"], "error: --workers 5000: give 1 to 1,024"),
])
def test_a_number_out_of_range_is_refused_in_one_line_before_anything_runs(argv, message, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written
