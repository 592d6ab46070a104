"""CPU threads chosen per model size (CLI, demo, nodes and library all train through Trainer), the
thread benchmark's command, and the echo schedule tied to the run's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from echodistill.cli import build_parser
from echodistill.models.pair import load_model_pair
from echodistill.training import threads
from echodistill.training.config import TrainConfig, echo_schedule, preset
from echodistill.training.data import load_concept_images
from echodistill.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_explicit", None)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_thread_count_follows_model_size_and_load():
    assert threads.cpu_threads_for(3_000_000, cores=16, load=0.0) == 1  # the mini world: one thread
    assert threads.cpu_threads_for(865_000_000, cores=16, load=0.0) == 16  # SD's UNet on an idle machine
    assert threads.cpu_threads_for(865_000_000, cores=16, load=5.2) == 11  # the cores not busy
    assert threads.cpu_threads_for(865_000_000, cores=2, load=7.0) == 1  # never below one


def _trainer(tiny_pair_folders, tmp_path) -> Trainer:
    pair = load_model_pair(*tiny_pair_folders)
    photos = tmp_path / "photos"
    photos.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 90, 30)).save(photos / f"p{i}.png")
    config = TrainConfig(steps=2, resolution=64, batch_size=1, echo=False, sample_every=0, save_every=0)
    return Trainer(pair, load_concept_images(photos, resolution=64), config, run_dir=tmp_path / "run")


def test_cpu_training_of_a_small_model_uses_one_thread(tiny_pair_folders, tmp_path, restore_threads):
    torch.set_num_threads(2)  # torch's default on this kind of machine: one per core
    trainer = _trainer(tiny_pair_folders, tmp_path)
    assert trainer.cpu_threads == 1 and torch.get_num_threads() == 1


def test_an_explicit_thread_count_wins(tiny_pair_folders, tmp_path, restore_threads, monkeypatch):
    threads.set_cpu_threads(2)
    assert _trainer(tiny_pair_folders, tmp_path).cpu_threads is None and torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "_explicit", None)
    monkeypatch.setenv(threads.ENV, "2")
    assert _trainer(tiny_pair_folders, tmp_path / "env").cpu_threads == 2


def test_the_command_line_asks_openmp_to_sleep_when_idle(monkeypatch):
    from echodistill import cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    import os

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_thread_benchmark_is_a_command():
    args = build_parser().parse_args(["bench", "threads", "--steps", "2", "--load", "0", "--load", "1"])
    assert args.steps == 2 and args.load == [0, 1] and args.run.__name__ == "run_threads"


def test_echo_schedule_follows_the_run_length():
    assert echo_schedule(1000) == {"echo_start": 500, "echo_every": 250}  # the paper's
    short = preset("paper", steps=200)
    assert (short.echo_start, short.echo_every) == (100, 50)
    assert preset("paper", steps=200, echo_start=150).echo_start == 150  # an explicit value stays
    assert preset("paper").echo_start == 500
    with pytest.warns(UserWarning, match="never echoes"):
        TrainConfig(steps=200, echo=True)


@pytest.mark.parametrize("graph", ["echodistill_train_and_sample", "echodistill_train_and_export"])
def test_shipped_workflows_echo_within_their_run(graph):
    """The Train Concept node builds its config with preset(steps=...): the echo switch does something."""
    workflow = json.loads((REPO / "workflows" / f"{graph}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "EchoDistillTrainConcept":
            values = node["widgets_values"]
            steps = next(v for v in values if isinstance(v, int) and v >= 100)
            config = preset("paper", steps=steps, echo=True)
            assert config.echo_start < steps and config.echo_start + config.echo_every <= steps
