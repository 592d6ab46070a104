"""`echodistill bench world-probe`: the teacher alone learns a subject's K/V + token row; the pair comes back as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from echodistill.benchmarks import world_probe
from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR
from echodistill.miniworld.oracle import AttributeReader, Oracle, SubjectEncoder
from echodistill.miniworld.procedural import procedural_subject
from echodistill.models.pair import load_model_pair


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    oracle = Oracle(AttributeReader(width=8, hidden=16).eval(), SubjectEncoder(width=8, dim=16).eval())
    return load_model_pair(TEACHER_DIR, STUDENT_DIR), oracle


def test_probe_trains_the_teacher_scores_it_and_hands_the_pair_back(world, tmp_path):
    pair, oracle = world
    before = {k: v.clone() for k, v in pair.teacher.unet.state_dict().items()}
    rows_before = pair.text_encoder.get_input_embeddings().weight.shape[0]
    settings = world_probe.ProbeSettings(steps=2, seeds=1)
    report = world_probe.run_world_probe(pair, oracle, [procedural_subject(3_000_000)], settings, tmp_path,
                                         log=lambda m: None)
    assert [r["concept"] for r in report["records"]] == ["procedural_3000000"]
    for record in report["records"]:
        assert 0 <= record["subject_fidelity"] <= 1 and 0 <= record["prompt_fidelity"] <= 1
        assert 0 <= record["prior_subject_fidelity"] <= 1
        # half of the 12 evaluation scenes are small: each half scored on its own
        by_size = record["subject_fidelity_by_size"]
        assert set(by_size) == {"small", "large"} and all(0 <= v <= 1 for v in by_size.values())
        assert sum(by_size.values()) / 2 == pytest.approx(record["subject_fidelity"], abs=1e-5)  # 6 and 6 pictures
        assert 0 <= record["fit_subject_fidelity"] <= 1  # the references redrawn from their own captions
    assert "small / large" in (tmp_path / "world_probe.md").read_text()
    assert "own captions (fit)" in (tmp_path / "world_probe.md").read_text()
    assert report["fair"] == (report["mean"]["subject_fidelity"] >= 0.5 and report["mean"]["prompt_fidelity"] >= 0.8)
    saved = json.loads((tmp_path / "world_probe.json").read_text())
    assert saved["settings"]["steps"] == 2 and saved["settings"]["min_scale"] == 1.0  # no subject shrunk at 64 px
    assert (tmp_path / "sheets" / "procedural_3000000_seed0.png").is_file() and "mean" in (tmp_path / "world_probe.md").read_text()
    assert report["records"][0]["seed"] == 0 and report["standard_error"] is None  # one subject: no spread to give
    assert 0 <= report["records"][0]["vae_ceiling"] <= 1 and "through the VAE" in (tmp_path / "world_probe.md").read_text()
    # the borrow is handed back: no adapter, no token row left behind
    after = pair.teacher.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pair.text_encoder.get_input_embeddings().weight.shape[0] == rows_before


def test_the_whole_unet_diagnostic_trains_every_weight_and_puts_them_all_back(world, tmp_path, monkeypatch):
    pair, oracle = world
    before = {k: v.clone() for k, v in pair.teacher.unet.state_dict().items()}
    changed = []
    real_sample = world_probe.sample_teacher

    def sample_and_compare(borrowed, *args, **kwargs):  # while trained: the UNet's own weights moved, no adapter
        now = borrowed.teacher.unet.state_dict()
        assert now.keys() == before.keys()
        changed.append(sum(not torch.equal(before[k], now[k]) for k in before))
        return real_sample(borrowed, *args, **kwargs)

    monkeypatch.setattr(world_probe, "sample_teacher", sample_and_compare)
    settings = world_probe.ProbeSettings(steps=2, lr=1e-3, trainable="unet", seeds=1)
    report = world_probe.run_world_probe(pair, oracle, [procedural_subject(3_000_001)], settings, tmp_path,
                                         log=lambda m: None)
    assert changed and min(changed) > len(before) // 2  # most tensors trained (a few get no gradient)
    after = pair.teacher.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # handed back exactly
    assert not any(p.requires_grad for p in pair.teacher.unet.parameters())
    assert report["fair"] is False and report["settings"]["trainable"] == "unet"
    assert "Diagnostic run, 2 step(s): every UNet weight" in (tmp_path / "world_probe.md").read_text()
    with pytest.raises(ValueError, match="trainable='lora'"):
        world_probe.ProbeSettings(trainable="lora")


def test_two_seeds_a_class_prior_and_a_paired_comparison(world, tmp_path, monkeypatch):
    """Each subject runs once per seed; the class pictures are drawn once per class word and seed by the untrained
    teacher and trained on in the same UNet call; --compare pairs the runs both reports made."""
    pair, oracle = world
    drawn, batches = [], []
    real_prior, real_call = world_probe.class_prior_set, world_probe.unet_call

    def counting_prior(pair_, class_word, count, seed):
        drawn.append((class_word, count, seed))
        assert not any("<v*>" in w for w in pair_.tokenizer.get_vocab())  # before the token row is added
        return real_prior(pair_, class_word, count, seed)

    def counting_call(unet, latents, timesteps, states):
        batches.append(len(latents))
        return real_call(unet, latents, timesteps, states)

    monkeypatch.setattr(world_probe, "class_prior_set", counting_prior)
    monkeypatch.setattr(world_probe, "unet_call", counting_call)
    subjects = [procedural_subject(3_000_002), procedural_subject(3_000_003)]
    settings = world_probe.ProbeSettings(steps=1, seeds=2, seed=4, prior_weight=1.0, prior_images=3)
    first = world_probe.run_world_probe(pair, oracle, subjects, settings, tmp_path / "a", log=lambda m: None)
    assert [(r["concept"], r["seed"]) for r in first["records"]] == [
        ("procedural_3000002", 4), ("procedural_3000002", 5), ("procedural_3000003", 4), ("procedural_3000003", 5)]
    classes = {s.class_word for s in subjects}
    assert sorted(drawn) == sorted({(c, 3, seed) for c in classes for seed in (4, 5)})  # once per class and seed
    assert batches == [2 * settings.batch] * 4  # subject pictures + as many class pictures, one call per step
    mean = sum(r["subject_fidelity"] for r in first["records"]) / 4
    assert first["mean"]["subject_fidelity"] == pytest.approx(mean)
    by_subject = first["subject_fidelity_by_subject"]
    assert set(by_subject) == {"procedural_3000002", "procedural_3000003"}
    a, b = by_subject.values()
    assert first["standard_error"] == pytest.approx(abs(a - b) / 2)  # n = 2: std/√2 = |a − b|/√2/√2
    assert first["fair"] is False  # the prior term makes it a diagnostic, whatever it scores
    text = (tmp_path / "a" / "world_probe.md").read_text()
    assert "Diagnostic run, 1 step(s): a class-prior term (weight 1, 3 class pictures)." in text
    assert "2 seed(s)" in text
    assert {p.name for p in (tmp_path / "a" / "sheets").iterdir()} == {
        f"procedural_300000{i}_seed{s}.png" for i in (2, 3) for s in (4, 5)}

    token_alone = world_probe.ProbeSettings(steps=1, seeds=1, seed=5, lr=0.0)
    second = world_probe.run_world_probe(pair, oracle, subjects[:1], token_alone, tmp_path / "b",
                                         log=lambda m: None, baseline=("a/world_probe.json", first))
    compared = second["compared_with"]
    assert compared["pairs"] == 1 and compared["standard_error"] is None
    assert compared["mean"] == pytest.approx(second["records"][0]["subject_fidelity"]
                                             - first["records"][1]["subject_fidelity"])
    text = (tmp_path / "b" / "world_probe.md").read_text()
    assert "Against a/world_probe.json: subject fidelity" in text and "paired over the 1 subject x seed" in text
    assert "one subject: no standard error" in text
    assert "Diagnostic run, 1 step(s): the token row alone" in text and second["fair"] is False
    # replacing a probe removes the sheets its report named and this one did not write, and nothing else
    earlier = json.loads((tmp_path / "b" / "world_probe.json").read_text())
    earlier["records"].append({**earlier["records"][0], "concept": "gone", "seed": 9})
    (tmp_path / "b" / "world_probe.json").write_text(json.dumps(earlier))
    for name in ("gone_seed9.png", "another_command_seed0.png"):
        (tmp_path / "b" / "sheets" / name).write_bytes(b"a sheet")
    world_probe.run_world_probe(pair, oracle, subjects[:1], token_alone, tmp_path / "b", log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "b" / "sheets").iterdir()) == [
        "another_command_seed0.png", "procedural_3000002_seed5.png"]
    with pytest.raises(ValueError, match="probed none of these subjects"):
        world_probe.run_world_probe(pair, oracle, [procedural_subject(3_000_004)], token_alone, tmp_path / "c",
                                    baseline=("a", first))
    assert not (tmp_path / "c").exists()  # refused before any work


def test_class_pictures_show_the_class_word_in_world_scenes(world):
    pair, _ = world
    latents, prompts = world_probe.class_prior_set(pair, "ring", 3, seed=0)
    assert latents.shape == (3, 4, 16, 16) and torch.isfinite(latents).all()
    assert len(prompts) == 3 and all(p.startswith("a ") and " ring" in p and "<v*>" not in p for p in prompts)
    again, same = world_probe.class_prior_set(pair, "ring", 3, seed=0)
    assert same == prompts and torch.equal(again, latents)  # the same pictures for the same seed
    assert world_probe.class_prior_set(pair, "ring", 3, seed=1)[1] != prompts
    with pytest.raises(ValueError, match="class word 'dog': the world's grammar draws only circle"):
        world_probe.class_prior_set(pair, "dog", 1, seed=0)


def test_probe_command_refuses_an_unknown_subject_and_a_missing_models_folder(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "echodistill", "bench", "world-probe", *args,
                               "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)

    unknown = run("--concepts", "dog")
    assert unknown.returncode == 2 and "unknown subject 'dog'" in unknown.stderr and "Traceback" not in unknown.stderr
    trained = run("--concepts", "procedural_5")  # the base models saw it: no test of the world
    assert trained.returncode == 2 and "procedural_5 is no fresh subject" in trained.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"records": []}')
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": [{"concept": "window", "seed": 0, "subject_fidelity": 0.4}]}))
    nan = tmp_path / "nan.json"
    nan.write_text('{"records": [{"concept": "smiley", "seed": 0, "subject_fidelity": NaN}]}')
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"records": [{"concept": "smiley", "seed": 0, "subject_fidelity": 0.4}] * 2}))
    nothing = run("--steps", "0")
    assert nothing.returncode == 2 and "--steps 0: give 1 or more" in nothing.stderr
    missing = run("--models", str(tmp_path / "nowhere"), "--steps", "1")
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "Traceback" not in missing.stderr
    for flags, message in ((("--lr", "nan"), "--lr nan: give a learning rate from 0 to 1"),
                           (("--token-lr", "-0.5"), "--token-lr -0.5: give a learning rate from 0 to 1"),
                           (("--lr", "1e300"), "--lr 1e+300: give a learning rate from 0 to 1"),
                           (("--seed", str(2**64)), f"--seed {2**64}: give an integer from 0 to 92233720368546"),
                           (("--lr", "0", "--token-lr", "0"), "train nothing"),
                           (("--min-scale", "0"), "--min-scale 0.0: give a fraction of the picture in (0, 1]"),
                           (("--seed", "-1"), "--seed -1: give an integer from 0 to"),
                           (("--fresh", "100001"), "--fresh 100001: give 0 to 100000"),
                           (("--trainable", "lora"), "argument --trainable: invalid choice: 'lora'"),
                           (("--seeds", "0"), "--seeds 0: give 1 to 20 seeds per subject"),
                           (("--prior-weight", "-1"), "--prior-weight -1.0: give a weight from 0 to 100"),
                           (("--prior-images", "0"), "--prior-images 0: give 1 to 10,000 class pictures"),
                           (("--compare", str(tmp_path / "none.json")), "none.json: no such file"),
                           (("--compare", str(bad)), "no world-probe records in it"),
                           (("--compare", str(other)), "probed none of these subjects with these seeds"),
                           (("--compare", str(nan)), "a subject fidelity outside 0..1 (or not a number)"),
                           (("--compare", str(twice)), "a subject and seed appear twice in it"),
                           (("--prior-images", "5"), "--prior-images 5 is read only with a class-prior term"),
                           (("--compare", ""), "--compare '': give the world_probe.json of an earlier run"),
                           (("--seed", str(2**62)), f"--seed {2**62}: give an integer from 0 to 92233720368546")):
        refused = run("--concepts", "smiley", *flags)  # before any model loads: no report with NaN in it
        assert refused.returncode == 2 and message in refused.stderr, (flags, refused.stderr)
        assert not (tmp_path / "sheets").exists() and not (tmp_path / "world_probe.json").exists()
    earlier = tmp_path / "world_probe.json"  # a finished probe in --out is kept, and never compared with itself
    earlier.write_text(json.dumps({"records": [{"concept": "smiley", "seed": 0, "subject_fidelity": 0.4}]}))
    kept = run("--concepts", "smiley", "--steps", "1")
    assert kept.returncode == 2 and "holds an earlier probe's report (world_probe.json)" in kept.stderr
    assert "pass --overwrite to replace it" in kept.stderr
    itself = run("--concepts", "smiley", "--overwrite", "--compare", str(earlier))
    assert itself.returncode == 2 and "is the report this run writes: give another --out" in itself.stderr
    assert json.loads(earlier.read_text())["records"][0]["subject_fidelity"] == 0.4
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    blocked = subprocess.run([sys.executable, "-m", "echodistill", "bench", "world-probe", "--concepts", "smiley",
                              "--out", str(a_file)], capture_output=True, text=True, timeout=300)
    assert blocked.returncode == 2 and "a_file is a file, not a folder" in blocked.stderr, blocked.stderr


def test_the_vae_ceiling_scores_the_exact_renders_after_the_round_trip(world):
    """A lossless stand-in VAE reaches the exact renders' own score; one that loses everything does not."""
    from types import SimpleNamespace

    import numpy as np

    from echodistill.miniworld.concepts import CONCEPTS, evaluation_prompts, reference_images
    from echodistill.miniworld.evaluate import vae_ceiling, vae_round_trip_fidelity
    from echodistill.miniworld.render import render

    _, oracle = world

    class StandIn(torch.nn.Module):
        def __init__(self, lossless: bool):
            super().__init__()
            self.lossless, self.anchor = lossless, torch.nn.Parameter(torch.zeros(1))

        def encode(self, pixels):  # (N, 3, 64, 64) in [-1, 1]
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels if self.lossless else pixels * 0 - 1))

        def decode(self, latents):
            return SimpleNamespace(sample=latents)

        device, dtype = torch.device("cpu"), torch.float32

    concept = CONCEPTS["smiley"]
    rng = np.random.default_rng(5)
    exact = np.stack([render(prompt.scene, rng) for prompt in evaluation_prompts(concept)])
    expected = oracle.subject_fidelity(exact, reference_images(concept))
    assert vae_round_trip_fidelity(StandIn(True), oracle, concept, layout_seed=5) == pytest.approx(expected, abs=1e-4)
    black = oracle.subject_fidelity(np.zeros_like(exact), reference_images(concept))
    assert vae_round_trip_fidelity(StandIn(False), oracle, concept, layout_seed=5) == pytest.approx(black, abs=1e-4)
    ceiling = vae_ceiling(StandIn(True), oracle)
    assert set(ceiling) == {*CONCEPTS, "mean"}
    assert ceiling["mean"] == pytest.approx(np.mean([ceiling[name] for name in CONCEPTS]), abs=1e-4)


def test_fresh_subjects_join_the_named_ones_each_once(tmp_path, monkeypatch):
    from echodistill.cli import bench as bench_cli
    from echodistill.cli import main

    probed = []

    def fake_probe(pair, oracle, subjects, settings, out, **kwargs):
        probed.extend(subject.name for subject in subjects)
        return {}

    monkeypatch.setattr(bench_cli, "load_world", lambda args: (None, None, {}))
    monkeypatch.setattr(world_probe, "run_world_probe", fake_probe)
    monkeypatch.setattr(world_probe, "markdown", lambda report: "")
    assert main(["bench", "world-probe", "--concepts", "3000001", "smiley", "--fresh", "3",
                 "--out", str(tmp_path / "probe")]) == 0
    # the named fresh subject is not probed twice: --fresh adds three others
    assert probed == ["procedural_3000001", "smiley", "procedural_3000000", "procedural_3000002",
                      "procedural_3000003"]
