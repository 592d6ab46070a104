"""`echodistill bench lr-sweep`: every family trained at every factor; the choice follows the rule."""

from __future__ import annotations

import json

import pytest
import torch

from echodistill.benchmarks import lr_sweep, quality
from echodistill.benchmarks.measuring import BenchError
from echodistill.miniworld.oracle import AttributeReader, Oracle, SubjectEncoder
from echodistill.models.pair import load_model_pair


def test_the_best_subject_fidelity_that_keeps_the_prompt_is_chosen():
    scores = {0.3: {"subject_fidelity": 0.20, "prompt_fidelity": 0.95},
              1.0: {"subject_fidelity": 0.25, "prompt_fidelity": 0.90},
              3.0: {"subject_fidelity": 0.40, "prompt_fidelity": 0.80}}  # best subject, but loses the prompt
    assert lr_sweep.choose_factor(scores, prior_prompt_fidelity=0.93) == 1.0
    assert lr_sweep.choose_factor(scores, prior_prompt_fidelity=0.84) == 3.0
    # nothing keeps the prompt: the factor that loses it least
    assert lr_sweep.choose_factor(scores, prior_prompt_fidelity=1.2) == 0.3


def _spied_world(tiny_pair_folders, monkeypatch, *fields: str):
    """A tiny pair, a random oracle, and the list every training appends (method, *config fields) to."""
    torch.manual_seed(0)
    oracle = Oracle(AttributeReader(width=8, hidden=16).eval(), SubjectEncoder(width=8, dim=16).eval())
    trained = []
    original = quality.train_method

    def spy(pair, name, config, images):
        trained.append((name, *(getattr(config, f) for f in fields)))
        assert images[0].caption.startswith("a {} on a plain ")
        return original(pair, name, config, images)

    monkeypatch.setattr(quality, "train_method", spy)
    return load_model_pair(*tiny_pair_folders), oracle, trained


def test_sweep_trains_each_family_at_each_factor_with_scaled_rates(tiny_pair_folders, tmp_path, monkeypatch):
    pair, oracle, trained = _spied_world(tiny_pair_folders, monkeypatch, "lr_student", "steps")
    report = lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, factors=[2.0, 0.5],
                                   families=["textual_inversion", "custom_diffusion"], out=tmp_path,
                                   log=lambda _: None)
    assert trained == [("textual_inversion", pytest.approx(2.5e-3), 1), ("textual_inversion", pytest.approx(1e-2), 1),
                       ("custom_diffusion", pytest.approx(5e-6), 1), ("custom_diffusion", pytest.approx(2e-5), 1)]
    assert set(report["chosen"]) == {"textual_inversion", "custom_diffusion"}
    assert all(factor in (0.5, 2.0) for factor in report["chosen"].values())
    written = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert written["chosen"] == report["chosen"] and len(written["records"]) == 4
    table = (tmp_path / "lr_sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| textual_inversion", "| custom_diffusion"))]
    assert "| x0.5 | x2 |" in table and [row.count("**") for row in rows] == [2, 2]  # one bold cell per family
    assert lr_sweep.lr_scale_argument(report["chosen"]).startswith("--lr-scale textual_inversion=")
    with pytest.raises(BenchError, match="families \\['teacher'\\]"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, factors=[1.0], families=["teacher"])
    with pytest.raises(BenchError, match="need factors > 0"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, factors=[0.0])


def test_the_token_stage_trains_each_family_at_its_factor_with_the_row_at_each_rate(tiny_pair_folders, tmp_path,
                                                                                       monkeypatch):
    pair, oracle, trained = _spied_world(tiny_pair_folders, monkeypatch, "lr_student", "lr_token")
    report = lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, token_rates=[1e-2, 1e-3],
                                   lr_scales={"custom_diffusion": 2.0}, families=["custom_diffusion"], out=tmp_path,
                                   log=lambda _: None)
    # rate 0 (the row at the adapters' rate) is always a candidate; every run at the family's factor (x2 of 1e-5)
    assert trained == [("custom_diffusion", pytest.approx(2e-5), 0.0), ("custom_diffusion", pytest.approx(2e-5), 1e-3),
                       ("custom_diffusion", pytest.approx(2e-5), 1e-2)]
    assert report["settings"]["token_rates"] == [0.0, 1e-3, 1e-2] and "factors" not in report["settings"]
    assert report["chosen"]["custom_diffusion"] in (0.0, 1e-3, 1e-2)
    assert [r["token_lr"] for r in report["records"]] == [0.0, 1e-3, 1e-2]
    table = (tmp_path / "lr_sweep.md").read_text()
    assert "| family | 0 | 0.001 | 0.01 |" in table and "(Custom Diffusion K/V on the student, x2)" in table
    arguments = lr_sweep.quality_arguments(report)
    assert arguments.startswith("--lr-scale custom_diffusion=2 --token-lr custom_diffusion=")
    with pytest.raises(BenchError, match="families \\['textual_inversion'\\]: give one or more of echodistill, "
                                         "custom_diffusion for --token-rates"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, token_rates=[1e-3],
                              families=["textual_inversion"])
    with pytest.raises(BenchError, match="token rates in \\(0, 1\\]"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="window", seed=7, steps=1, token_rates=[2.0],
                              families=["custom_diffusion"])


def test_a_sweep_can_tune_on_a_fresh_procedural_subject_no_table_row_scores(tiny_pair_folders, tmp_path):
    torch.manual_seed(0)
    oracle = Oracle(AttributeReader(width=8, hidden=16).eval(), SubjectEncoder(width=8, dim=16).eval())
    pair = load_model_pair(*tiny_pair_folders)
    report = lr_sweep.run_lr_sweep(pair, oracle, concept="3000002", seed=7, steps=1, factors=[1.0],
                                   families=["textual_inversion"], out=tmp_path, log=lambda _: None)
    assert report["settings"]["concept"] == "procedural_3000002"
    assert {r["concept"] for r in report["records"]} == {"procedural_3000002"}
    with pytest.raises(BenchError, match="concept: unknown subject 'dog'"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="dog", seed=7, steps=1, factors=[1.0])
    with pytest.raises(BenchError, match="concept: procedural_5 is no fresh subject"):
        lr_sweep.run_lr_sweep(pair, oracle, concept="procedural_5", seed=7, steps=1, factors=[1.0])
