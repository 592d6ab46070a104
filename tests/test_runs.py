"""Runs: a checkpoint at every end, one writer per output, the photos in the run identity, writes checked first and
failing without losing the run, any grad mode."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from echodistill import files
from echodistill.cli import main
from echodistill.errors import EchoDistillError, OutputBusyError, OutputWriteError
from echodistill.jobs.runs import run_key, train_concept
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import sample_student
from echodistill.training.checkpointing import TrainingCheckpoint
from echodistill.training.config import TrainConfig
from echodistill.training.data import load_concept_images
from echodistill.training.trainer import Trainer


def _pictures(shift: int = 0):
    pictures = []
    for i in range(3):
        picture = Image.new("RGB", (64, 64), (200, 40 * i + shift, 60))
        picture.paste((20, 20, 220), (16 + 4 * i, 16, 40 + 4 * i, 48))
        pictures.append(picture)
    return pictures


def _config(**changes) -> TrainConfig:
    base = dict(steps=2, batch_size=2, resolution=64, class_word="dog", echo=False, sample_every=0, save_every=0,
                ms_swd_projections=8, ms_swd_scales=2)
    return TrainConfig(**{**base, **changes})


def _no_space(tmp, data):
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


def test_every_run_ends_with_a_checkpoint_that_more_steps_resume(tiny_pair_folders, tmp_path):
    pair = load_model_pair(*tiny_pair_folders)
    trainer = Trainer(pair, load_concept_images(_pictures(), resolution=64), _config(steps=4, save_every=3),
                      run_dir=tmp_path / "run")
    trainer.train()
    assert TrainingCheckpoint.load(tmp_path / "run" / "checkpoint.pt").step == 4  # not 3

    pair = load_model_pair(*tiny_pair_folders)
    # Asking the finished run for more steps continues it from its last step (same run folder: steps not in the key).
    images = _pictures()
    assert run_key(pair, images, _config(steps=2)) == run_key(pair, images, _config(steps=3))
    first = train_concept(pair, images, _config(steps=2), run_dir=tmp_path / "job")
    more = train_concept(pair, images, _config(steps=3), run_dir=tmp_path / "job")
    assert (first.bundle.step, more.resumed_from, more.bundle.step) == (2, 2, 3)
    with pytest.raises(EchoDistillError, match="holds this run at step 3, beyond steps=2: ask for 3 steps or more"):
        train_concept(pair, images, _config(steps=2), run_dir=tmp_path / "job", reuse_finished=False)


def test_a_field_added_later_at_its_earlier_behaviour_keeps_the_key_of_runs_made_before_it():
    from types import SimpleNamespace

    pair = SimpleNamespace(fingerprints=lambda: {"teacher": "t", "student": "s"})
    images = [Image.new("RGB", (8, 8), (200, 40, 60))]
    config = TrainConfig(steps=2, class_word="dog", echo=False)
    # the key this run had before lr_token existed: its finished result and checkpoint are still found
    assert run_key(pair, images, config) == run_key(pair, images, config.with_changes(lr_token=0.0)) == (
        "c70fd174d51f7279")
    assert run_key(pair, images, config.with_changes(lr_token=1e-3)) != "c70fd174d51f7279"  # another run


def test_a_finished_bundle_edited_since_is_refused_naming_it_not_reused(tiny_pair_folders, tmp_path):
    import dataclasses

    from echodistill.concepts.bundle import ConceptBundle
    from echodistill.concepts.export import ExportError

    pair, images, run = load_model_pair(*tiny_pair_folders), _pictures(), tmp_path / "job"
    train_concept(pair, images, _config(), run_dir=run)
    finished = run / "concept.safetensors"
    bundle = ConceptBundle.load(finished)
    key = sorted(bundle.student_adapter)[0]
    dataclasses.replace(bundle, student_adapter={**bundle.student_adapter, key: bundle.student_adapter[key][..., :-8]}
                        ).save(finished)
    with pytest.raises(ExportError, match=rf"^concept\.safetensors: {re.escape(key.removesuffix('.delta'))}: ΔW has "
                                          r"shape .* the bundle was edited or damaged; use the bundle as training saved "
                                          rf"it \(the finished run in {re.escape(str(run))}: delete concept\.safetensors "
                                          r"there to train it again\)$"):
        train_concept(pair, images, _config(), run_dir=run)
    finished.unlink()  # as the message says: the run's checkpoint then writes the bundle again, nothing retrained
    again = train_concept(pair, images, _config(), run_dir=run)
    assert (again.resumed_from, again.history, again.bundle.step) == (2, [], 2)
    assert torch.equal(ConceptBundle.load(finished).student_adapter[key], bundle.student_adapter[key])


def test_a_failed_bundle_write_keeps_the_run_and_says_where(tiny_pair_folders, tmp_path, monkeypatch):
    pair = load_model_pair(*tiny_pair_folders)
    real = files._write_bytes

    def full_for_bundles(tmp, data):
        if ".concept.safetensors." in tmp.name:
            _no_space(tmp, data)
        real(tmp, data)

    monkeypatch.setattr(files, "_write_bytes", full_for_bundles)
    with pytest.raises(OutputWriteError, match=r"cannot write .*concept\.safetensors: no space left on the device; "
                                               r"the trained state is kept in .*checkpoint\.pt \(step 2\)"):
        train_concept(pair, _pictures(), _config(), run_dir=tmp_path / "run")
    assert not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.setattr(files, "_write_bytes", real)
    again = train_concept(pair, _pictures(), _config(), run_dir=tmp_path / "run")
    assert again.resumed_from == 2 and again.history == []  # nothing trained again
    assert (tmp_path / "run" / "concept.safetensors").is_file()


def test_train_concept_refuses_fewer_than_three_photos_before_any_step(tiny_pair_folders, tmp_path):
    """The job every front end runs (nodes, fleet workers) holds to the method's 3-20 photos as the CLI does."""
    pair = load_model_pair(*tiny_pair_folders)
    with pytest.raises(EchoDistillError, match=r"the photos given: 2 photo\(s\).*learned from 3 to 20 photos"):
        train_concept(pair, _pictures()[:2], _config(), run_dir=tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.pt")) and not (tmp_path / "run" / "concept.safetensors").exists()


def test_a_full_disk_at_a_checkpoint_names_the_cause_and_the_last_good_one(tiny_pair_folders, tmp_path, monkeypatch):
    pair = load_model_pair(*tiny_pair_folders)
    trainer = Trainer(pair, load_concept_images(_pictures(), resolution=64), _config(steps=3, save_every=1),
                      run_dir=tmp_path / "run")
    real, calls = files._write_bytes, []

    def full_at_second(tmp, data):
        calls.append(tmp)
        if len(calls) == 2:
            _no_space(tmp, data)
        real(tmp, data)

    monkeypatch.setattr(files, "_write_bytes", full_at_second)
    with pytest.raises(OutputWriteError, match=r"checkpoint\.pt: no space left on the device; step 2 could not be "
                                               r"saved, the last checkpoint written is .*checkpoint\.pt \(step 1\)"):
        trainer.train()


def test_outputs_are_probed_before_the_first_step(tiny_pair_folders, tmp_path, monkeypatch, capsys):
    teacher, student = tiny_pair_folders
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, picture in enumerate(_pictures()):
        picture.save(photos / f"{i}.png")
    read_only = tmp_path / "read-only"
    real_mkstemp = files.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # a read-only folder (tests may run as root, so chmod is not enough)
        if str(dir).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained before the outputs were checked"))
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--images", str(photos),
                 "--class-word", "cup", "--out", str(read_only / "c.safetensors"), "--run-dir", str(tmp_path / "r"),
                 "--steps", "1", "--resolution", "64", "--set", "echo=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {read_only}: no permission to write there") and err.count("\n") == 1
    assert main(["sample", "--teacher", str(teacher), "--student", str(student), "--prompt", "a cup",
                 "--out", str(read_only / "pngs")]) == 2
    assert "error: cannot write" in capsys.readouterr().err
    with pytest.raises(OutputWriteError, match="no permission"):
        train_concept(load_model_pair(teacher, student), _pictures(), _config(), run_dir=read_only / "run")


def test_a_second_training_into_the_same_output_is_refused_naming_the_first(tiny_pair_folders, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from echodistill.files import exclusive_output
            with exclusive_output({str(tmp_path / "run")!r}):
                print("held", flush=True)
                time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        pair = load_model_pair(*tiny_pair_folders)
        with pytest.raises(OutputBusyError, match=rf"another training is already writing .*run \(process {holder.pid} "
                                                  r"on .* since .*\): wait for it to finish"):
            train_concept(pair, _pictures(), _config(), run_dir=tmp_path / "run")
        trainer = Trainer(pair, load_concept_images(_pictures(), resolution=64), _config(), run_dir=tmp_path / "run")
        with pytest.raises(OutputBusyError, match=f"process {holder.pid}"):
            trainer.train()
    finally:
        holder.kill()
        holder.wait()
    assert train_concept(load_model_pair(*tiny_pair_folders), _pictures(), _config(),
                         run_dir=tmp_path / "run").bundle.step == 2  # free again once the first is gone


def test_resume_refuses_other_photos_or_captions(tiny_pair_folders, tmp_path):
    pair = load_model_pair(*tiny_pair_folders)
    first = Trainer(pair, load_concept_images(_pictures(), resolution=64), _config(steps=1), run_dir=tmp_path / "run")
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    for images in (load_concept_images(_pictures(shift=5), resolution=64),
                   load_concept_images(_pictures(), captions=["a {} outside"] * 3, resolution=64)):
        other = Trainer(load_model_pair(*tiny_pair_folders), images, _config(steps=2), run_dir=tmp_path / "other")
        with pytest.raises(EchoDistillError, match="cannot resume: the checkpoint was trained on other photos or "
                                                   "captions than the ones given"):
            other.resume(checkpoint)
    same = Trainer(load_model_pair(*tiny_pair_folders), load_concept_images(_pictures(), resolution=64),
                   _config(steps=2), run_dir=tmp_path / "run")
    same.resume(checkpoint)
    assert same.step == 1


def test_a_pair_loaded_in_inference_mode_samples_and_trains(tiny_pair_folders, tmp_path):
    with torch.inference_mode():
        pair = load_model_pair(*tiny_pair_folders)
        first = sample_student(pair, ["a photo of a dog"], seeds=[0], width=64, height=64).images
        again = sample_student(pair, ["a photo of a dog"], seeds=[0], width=64, height=64).images
        result = train_concept(pair, _pictures(), _config(steps=1), run_dir=tmp_path / "run")
        concept = sample_student(pair, ["a photo of a <v*> dog"], seeds=[0], width=64, height=64).images
    assert torch.equal(first, again) and result.bundle.step == 1 and concept.shape == (1, 3, 64, 64)
    with torch.inference_mode():
        from echodistill.sampling.with_concept import sample

        applied = sample(pair, ["a photo of a <v*> dog"], concept=result.bundle, seeds=[0], width=64, height=64,
                         return_latents=False).images
    assert applied.shape == (1, 3, 64, 64) and not torch.equal(applied, concept)


def test_a_longer_run_of_a_preset_continues_its_shorter_run_whose_echo_schedule_scaled_with_it(
    tiny_pair_folders, tmp_path
):
    from echodistill.training.config import preset

    def scaled(steps, **changes):  # a preset scales echo_start / echo_every to the run's length
        return preset("paper", steps=steps, resolution=64, class_word="dog", batch_size=2, sample_every=0,
                      save_every=0, echo_samples=2, ms_swd_projections=8, ms_swd_scales=2, **changes)

    short, long = scaled(4), scaled(8)
    assert (short.echo_start, short.echo_every) != (long.echo_start, long.echo_every)
    pair = load_model_pair(*tiny_pair_folders)
    images = _pictures()
    assert run_key(pair, images, short) == run_key(pair, images, long)  # the same run, asked for more steps
    assert run_key(pair, images, short) != run_key(pair, images, scaled(4, echo_start=1))  # another schedule
    first = train_concept(pair, images, short, run_dir=tmp_path / "job")
    more = train_concept(pair, images, long, run_dir=tmp_path / "job")
    assert (first.bundle.step, more.resumed_from, more.bundle.step) == (4, 4, 8)
    # At the same length, another echo schedule is another run: resuming it is refused.
    checkpoint = TrainingCheckpoint.load(tmp_path / "job" / "checkpoint.pt")
    with pytest.raises(EchoDistillError, match="differs from the checkpoint's in echo_start"):
        checkpoint.check_compatible(scaled(8, echo_start=1), pair.fingerprints())
