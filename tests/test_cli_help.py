"""The command line as a new user meets it: help and argument errors at once, every option explained,
the same subject names as the ComfyUI loaders. No model is loaded here."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from echodistill.cli import build_parser, in_flag_terms, main
from echodistill.cli.demo import subject_name
from echodistill.errors import EchoDistillError
from echodistill.miniworld.procedural import VALIDATION_SEEDS, subject_references

ROOT = Path(__file__).resolve().parents[1]

# Run `echodistill ARGS` and report whether torch (or diffusers) got imported on the way.
PROBE = """
import runpy, sys
sys.argv = ["echodistill", *sys.argv[1:]]
try:
    runpy.run_module("echodistill", run_name="__main__")
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args", [
    ("--help",),
    ("sample", "--help"),
    ("demo", "--help"),
    ("bench", "--help"),
    ("bench", "world-probe", "--help"),
    ("sample",),  # missing required options: an argument error
    ("demo", "--concept", "no_such_subject"),
    ("no-such-command",),
])
def test_help_and_argument_errors_import_no_torch(args):
    result = _run(*args)
    assert result.stderr.strip().endswith("HEAVY:"), result.stderr[-2000:]
    if "--help" in args:
        assert "usage: echodistill" in result.stdout
    else:
        assert "error:" in result.stderr


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    """(command path, action) for every option of every (sub)command, building each lazily added one."""
    parser.populate()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_commands_help_imports_no_torch():
    """`--help` answers at once for every command: none loads torch to name its choices (in one process, so
    the test does not start torch 20 times)."""
    paths = sorted({path[1:] for path, _ in _options(build_parser(), ("echodistill",)) if len(path) > 1})
    assert ("bench", "quality") in paths and ("fleet", "run") in paths
    probe = PROBE.replace('sys.argv = ["echodistill", *sys.argv[1:]]\ntry:\n    runpy.run_module("echodistill", '
                          'run_name="__main__")\nexcept SystemExit as stop:\n    code = stop.code',
                          "import contextlib, io\nfor path in " + repr([list(p) for p in paths]) + ":\n"
                          "    sys.argv = ['echodistill', *path, '--help']\n"
                          "    with contextlib.redirect_stdout(io.StringIO()):\n"
                          "        try:\n            runpy.run_module('echodistill', run_name='__main__')\n"
                          "        except SystemExit:\n            pass\n"
                          "    loaded = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
                          "    assert not loaded, (path, loaded)")
    assert "for path in" in probe  # the loop replaced the single run
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.strip().endswith("HEAVY:"), result.stderr[-2000:]


def test_every_option_of_every_command_says_what_it_does_and_shows_its_default():
    options = list(_options(build_parser(), ("echodistill",)))
    assert len({path for path, _ in options}) >= 13  # every command and bench's five
    undocumented = [f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
                    for path, action in options if not (action.help or "").strip()]
    assert undocumented == []
    sample = build_parser()._subparsers._group_actions[0].choices["teacher-sample"].format_help()
    assert "(default: 25)" in " ".join(sample.split()) and "(default: 7.5)" in " ".join(sample.split())


def test_the_demo_takes_shipped_and_fresh_procedural_subjects_by_name():
    assert subject_name("checker_diamond") == "checker_diamond"
    fresh = f"procedural_{VALIDATION_SEEDS.start + 7}"
    args = build_parser().parse_args(["demo", "--concept", fresh])
    assert args.concept == fresh
    with pytest.raises(argparse.ArgumentTypeError, match="unknown subject 'dog'.*procedural_<seed> or a bare seed"):
        subject_name("dog")


def test_the_demo_takes_a_bare_seed_for_a_fresh_procedural_subject_and_draws_its_references():
    from echodistill.miniworld.procedural import lookup_subject
    from echodistill.miniworld.scoring import UnitInputs

    seed = VALIDATION_SEEDS.start + 7
    # leading zeros are dropped before int(), which reads 4,300 digits at most
    for written in (str(seed), f"procedural_{seed}", f"procedural_0{seed}", "0" * 5000 + str(seed)):
        assert build_parser().parse_args(["demo", "--concept", written]).concept == f"procedural_{seed}"
    unit = UnitInputs.build(lookup_subject(f"procedural_{seed}"), 0, 1, captions=True)  # what the demo trains on
    assert unit.reference_pixels.shape == (5, 3, 64, 64) and len(unit.texts) == 12
    assert all(image.caption.startswith("a {} on a plain ") for image in unit.images)
    assert all(f"<v*> {unit.concept.class_word}" in text for text in unit.texts)
    other = UnitInputs.build(lookup_subject(f"procedural_{seed + 1}"), 0, 1, captions=True)
    assert not (unit.reference_pixels == other.reference_pixels).all()  # each seed its own subject


@pytest.mark.parametrize(("concept", "message"), [
    ("procedural_x", "unknown subject 'procedural_x': use a shipped one (checker_diamond, "),
    ("3.5", "unknown subject '3.5'"),
    ("-5", "unknown subject '-5'"),
    ("\u00b2", "unknown subject '\u00b2'"),  # a digit to str.isdigit, no number to int()
    ("procedural_", "unknown subject 'procedural_'"),
    ("5", "procedural_5 is no fresh subject: seeds 0-999999 trained the base models and the image-prompt adapter; "
          f"pick one nobody trained on, e.g. {VALIDATION_SEEDS.start}"),
    ("procedural_2000001", "procedural_2000001 is no fresh subject: seeds 2000000-2099999 trained the subject oracle"),
    ("3" * 300, f"unknown subject '{'3' * 40}...': use a shipped one"),  # no file name could hold it
    (str(2**63), f"unknown subject '{2**63}'"),
    ("7" * 5000, "unknown subject '7777"),  # longer than int() reads
])
def test_the_demo_refuses_a_bad_subject_in_one_line(concept, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["demo", "--concept", concept])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("echodistill demo: error: argument --concept: " + message)


def test_miniworld_subject_names_read_as_reference_folders():
    pictures, captions = subject_references("miniworld/checker_diamond")
    assert len(pictures) == len(captions) == 5 and pictures[0].size == (64, 64)
    procedural, _ = subject_references(f"miniworld/procedural_{VALIDATION_SEEDS.start}")
    assert procedural[0].size == (64, 64)
    assert subject_references("photos/dog") is None
    with pytest.raises(ValueError, match="unknown subject 'unicorn'"):
        subject_references("miniworld/unicorn")


def test_library_arguments_in_errors_read_as_flags():
    error = EchoDistillError("nothing to evaluate: pass clip_path= (a CLIP folder) and/or dino_path= (DINO)",
                             parameters=("clip_path", "dino_path"))
    assert error.in_terms_of({"clip_path": "--clip", "dino_path": "--dino"}) == (
        "nothing to evaluate: pass --clip (a CLIP folder) and/or --dino (DINO)")
    commands = build_parser()._subparsers._group_actions[0].choices
    export, sample, demo = (commands[name].populate() for name in ("export", "sample", "demo"))
    assert in_flag_terms("x exists; pass overwrite=True to replace it", ("overwrite",), export) == (
        "x exists; pass --overwrite to replace it")
    assert in_flag_terms("width=512 x height=512 is far", ("width", "height"), sample) == (
        "--width 512 x --height 512 is far")
    # a training config field the demo takes through --set, and one the sampler cannot take at all
    assert in_flag_terms("resolution=48 must be a multiple of 64", ("resolution",), demo) == (
        "--set resolution=48 must be a multiple of 64")
    assert in_flag_terms("resolution=48 must be a multiple of 64", ("resolution",), sample) == (
        "resolution=48 must be a multiple of 64")


def test_the_demo_sheet_captions_every_column_and_leaves_no_empty_cell():
    import torch

    from echodistill.imaging import LINE_HEIGHT, contact_sheet

    references, images = torch.zeros(5, 3, 64, 64), torch.ones(12, 3, 64, 64)
    prompts = [f"a large <v*> square on the left, on a blue striped background {i}" for i in range(12)]
    sheet = contact_sheet(references, [("student, 1 step", images), ("teacher, 25 steps", images)], prompts,
                          columns=6, zoom=2, label_width=120, gap=6)
    assert sheet.width == 120 + 6 * (128 + 6) + 6
    # references, then two bands of six prompts: a caption of at most 4 lines over a student and a teacher row
    assert 6 + 128 + 12 + 2 * (2 * LINE_HEIGHT + 6 + 2 * (128 + 6) + 6) <= sheet.height
    assert sheet.height <= 6 + 128 + 12 + 2 * (4 * LINE_HEIGHT + 6 + 2 * (128 + 6) + 6)
    with pytest.raises(ValueError, match=r"one image per caption \(12\)"):
        contact_sheet(references, [("student", images[:5])], prompts)


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "error: --steps 0 must be at least 1"),
    (["--set", "echo=maybe"], "error: --set echo='maybe' must be true or false"),
    (["--set", "seed=99999999999999999999"], "error: --set seed=99999999999999999999 must be at most "),
    (["--seed", str(2**62)], f"error: --seed {2**62}: give 0 to 92,233,720,368,546 (the demo's sampling noise"),
    (["--set", f"seed={2**62}"], f"error: --set seed={2**62}: give 0 to 92,233,720,368,546 (the demo's sampling"),
])
def test_the_demo_refuses_a_bad_value_before_it_prints_or_writes_anything(argv, message, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no header, no progress bar
    assert captured.err.strip().startswith(message)
    assert not out.exists()


def test_the_demo_refuses_an_unusable_out_folder_before_it_prints_anything(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "demo")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error: " in captured.err and str(blocker) in captured.err
    assert main(["demo", "--out", ""]) == 2
    assert capsys.readouterr().err.strip() == "error: --out '': name the folder for the bundle, contact sheet and metrics"


def test_the_demo_refuses_to_replace_an_earlier_demos_results_unless_told_to(tmp_path, capsys, monkeypatch):
    from echodistill.errors import ConfigError
    from echodistill.jobs import demo as demo_job

    out = tmp_path / "demo"
    earlier = {out / "window.safetensors": b"bundle", out / "window_metrics.json": b"{}",
               out / "run" / "checkpoint.pt": b"checkpoint"}
    for path, data in earlier.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert main(["demo", "--concept", "window", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the header and the bar, as train refuses an existing --out
    assert captured.err == (f"error: --out {out} holds an earlier demo's results (window.safetensors, "
                            "window_metrics.json): pick another --out, or pass --overwrite to run "
                            "the demo anew and replace them\n")
    assert main(["demo", "--concept", "smiley", "--out", str(out), "--steps", "0"]) == 2  # another subject: its
    assert "holds an earlier demo" not in capsys.readouterr().err  # own results are none; run/ no demo resumes
    assert main(["demo", "--concept", "window", "--out", str(out), "--set", "echo_start=0"]) == 2
    assert "echo_start" not in capsys.readouterr().err  # the refusal comes before the config is even read
    with pytest.raises(ConfigError, match=r"holds an earlier demo's results .*pass overwrite=True"):
        demo_job.run_demo(out, concept_name="window")  # the library refuses alike, before any model loads
    assert {path: path.read_bytes() for path in earlier} == earlier  # nothing replaced

    asked = []

    def finished(out_dir, *, concept_name, overwrite, **_):  # the job itself, without its minutes of training
        asked.append(overwrite)
        sheet, bundle = out / f"{concept_name}_contact_sheet.png", out / f"{concept_name}.safetensors"
        return demo_job.DemoReport(concept_name, 2, 0, 4, 1.0, 0.1, 0.2, 0.3, 0.4, 0.05, str(sheet), str(bundle))

    monkeypatch.setattr(demo_job, "run_demo", finished)
    assert main(["demo", "--concept", "window", "--out", str(out), "--overwrite"]) == 0
    assert asked == [True]
    last = capsys.readouterr().out.splitlines()[-1]  # every file it wrote, the metrics too
    assert last == (f"trained in 1 s; contact sheet {out / 'window_contact_sheet.png'}; bundle "
                    f"{out / 'window.safetensors'}; metrics {out / 'window_metrics.json'}"), last
