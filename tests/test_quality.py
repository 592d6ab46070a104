"""`echodistill bench quality`: every row trained, sampled and scored; the report's numbers add up.

Runs on the tiny random pair with an untrained oracle (the pipeline, not the scores, is tested);
the command-line smoke test uses the shipped mini-world models when they are present.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from echodistill.benchmarks import methods, quality, quality_report
from echodistill.benchmarks.measuring import BenchError
from echodistill.errors import ConfigError
from echodistill.miniworld import recipe, scoring
from echodistill.miniworld.image_prompt import ImagePromptAdapter, ImagePromptError, image_prompt_student
from echodistill.miniworld.oracle import AttributeReader, Oracle, SubjectEncoder
from echodistill.models.pair import load_model_pair


@pytest.fixture(scope="module")
def random_oracle():
    torch.manual_seed(0)
    return Oracle(AttributeReader(width=8, hidden=16).eval(), SubjectEncoder(width=8, dim=16).eval())


def _forbid_training(monkeypatch):
    monkeypatch.setattr(quality, "train_method", lambda *a, **k: pytest.fail("a method was trained"))


def _adapter(unet) -> ImagePromptAdapter:
    """A small random image-prompt adapter for `unet` (the row's pipeline, not its quality, is tested)."""
    torch.manual_seed(0)
    return ImagePromptAdapter.for_unet(unet, tokens=2, width=8).eval().requires_grad_(False)


def test_every_method_is_trained_sampled_and_scored_once_per_concept_and_seed(
    tiny_pair_folders, random_oracle, tmp_path, monkeypatch
):
    pair = load_model_pair(*tiny_pair_folders)
    trained = []
    original = quality.train_method

    def spy(pair, name, config, images):
        trained.append((name, config.steps, config.seed))
        return original(pair, name, config, images)

    monkeypatch.setattr(quality, "train_method", spy)
    out = tmp_path / "quality"
    every = dict(concepts=["smiley"], seeds=[3], steps=2, methods=list(methods.METHODS), images_per_prompt=1,
                 image_prompt=_adapter(pair.student.unet), log=lambda _: None)
    report = quality.run_quality(pair, random_oracle, out=out, **every)
    # One training per method, the teacher row sampling the full run's teacher, the image prompt none:
    # equal budgets, one seed.
    assert sorted(trained) == sorted((m, 2, 3) for m in methods.METHODS
                                     if m not in ("teacher", "teacher_no_echo", scoring.IMAGE_PROMPT))
    records = {r["method"]: r for r in report["records"]}
    assert set(records) == {scoring.PRIOR, scoring.START_PRIOR, scoring.TEACHER_PRIOR, *methods.METHODS}
    assert all(r["concept"] == "smiley" and r["seed"] == 3 for r in records.values())
    for record in records.values():
        assert 0 <= record["subject_fidelity"] <= 1 and 0 <= record["prompt_fidelity"] <= 1
    assert records["teacher"]["trained_as"] == "echodistill"
    assert records["teacher"]["train_seconds"] == records["echodistill"]["train_seconds"] > 0
    assert records["teacher_no_echo"]["trained_as"] == "no_echo"  # the echo measured on the teacher too
    assert records["teacher_no_echo"]["train_seconds"] == records["no_echo"]["train_seconds"] > 0
    assert records[scoring.PRIOR]["train_seconds"] is None and records[scoring.TEACHER_PRIOR]["train_seconds"] is None
    assert records["sequential"]["seconds_per_step"] == pytest.approx(records["sequential"]["train_seconds"] / 2)
    assert records[scoring.IMAGE_PROMPT]["train_seconds"] == records[scoring.IMAGE_PROMPT]["seconds_per_step"] == 0
    assert [row["method"] for row in report["summary"]] == [scoring.PRIOR, scoring.START_PRIOR, scoring.TEACHER_PRIOR,
                                                            *methods.METHODS]

    assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "quality.md").read_text()
    for method in methods.METHODS.values():
        assert f"| {method.label} |" in table
    assert (out / "sheets" / "smiley-seed3.png").is_file()
    assert len(list((out / "bundles").glob("smiley-seed3-*.safetensors"))) == len(methods.METHODS) - 3
    assert "| w/o echo: teacher, 25 DDIM steps (against EchoDistill teacher, 25 DDIM steps) |" in table

    _forbid_training(monkeypatch)  # a finished concept x seed is kept by --resume, not retrained
    again = quality.run_quality(pair, random_oracle, out=out, resume=True, **every)
    assert again["records"] == json.loads(json.dumps(report["records"]))
    # a prior row missing from a finished unit (a row added since) is scored on resume, with no training
    saved = json.loads((out / "quality.json").read_text())
    saved["records"] = [r for r in saved["records"] if r["method"] != scoring.TEACHER_PRIOR]
    (out / "quality.json").write_text(json.dumps(saved))
    filled = quality.run_quality(pair, random_oracle, out=out, resume=True, **every)
    by_method = {r["method"]: r for r in filled["records"]}
    assert by_method[scoring.TEACHER_PRIOR] == json.loads(json.dumps(records[scoring.TEACHER_PRIOR]))
    assert len(filled["records"]) == len(report["records"])
    # a report from before the token row had its own rate trained it at its adapters' rate: resumable at 0
    saved = json.loads((out / "quality.json").read_text())
    del saved["settings"]["token_lrs"]
    (out / "quality.json").write_text(json.dumps(saved))
    published = {"token_lrs": {"echodistill": 0.0, "custom_diffusion": 0.0}}
    assert quality.run_quality(pair, random_oracle, out=out, resume=True, **every, **published)["records"]
    with pytest.raises(BenchError, match=r"was written with other settings \(token_lrs\)"):
        quality.run_quality(pair, random_oracle, out=out, resume=True, **every)  # the tuned 1e-3: another table
    with pytest.raises(BenchError, match=r"was written with other settings \(steps\)"):
        quality.run_quality(pair, random_oracle, out=out, resume=True, **{**every, **published, "steps": 5})


def test_a_fresh_procedural_subject_is_trained_and_scored_on_its_own_references(tiny_pair_folders, random_oracle,
                                                                               tmp_path, monkeypatch):
    from echodistill.miniworld.procedural import procedural_subject

    pair = load_model_pair(*tiny_pair_folders)
    trained = []
    original = quality.train_method

    def spy(pair, name, config, images):
        trained.append((name, config.class_word, len(images)))
        return original(pair, name, config, images)

    monkeypatch.setattr(quality, "train_method", spy)
    subject = procedural_subject(3_000_001)
    # the bare seed and its full name are one subject, trained once
    report = quality.run_quality(pair, random_oracle, concepts=["3000001", "procedural_3000001"], seeds=[0], steps=1,
                                 methods=["textual_inversion"], images_per_prompt=1, out=tmp_path,
                                 log=lambda _: None)
    assert trained == [("textual_inversion", subject.class_word, 5)]
    assert {r["concept"] for r in report["records"]} == {"procedural_3000001"}
    assert report["settings"]["concepts"] == ["procedural_3000001"]
    assert (tmp_path / "sheets" / "procedural_3000001-seed0.png").is_file()


def test_the_teacher_row_alone_trains_the_full_run_but_reports_only_the_teacher(
    tiny_pair_folders, random_oracle, monkeypatch
):
    pair = load_model_pair(*tiny_pair_folders)
    report = quality.run_quality(pair, random_oracle, concepts=["window"], seeds=[0], steps=2, methods=["teacher"],
                                 images_per_prompt=1, log=lambda _: None)
    assert [r["method"] for r in report["records"]] == [scoring.PRIOR, scoring.START_PRIOR, scoring.TEACHER_PRIOR,
                                                        "teacher"]
    assert [row["label"] for row in report["summary"]][:3] == [
        methods.PRIOR_LABEL, "untrained student, token at its starting row (the class word's)",
        "class-word prior of the teacher (25 steps, untrained, token removed)"]


def test_the_image_prompt_row_trains_nothing_and_is_paired_with_echodistill_unit_by_unit(
    tiny_pair_folders, random_oracle, monkeypatch
):
    pair = load_model_pair(*tiny_pair_folders)
    trained = []
    original = quality.train_method
    monkeypatch.setattr(quality, "train_method", lambda *a: trained.append(a[1]) or original(*a))
    report = quality.run_quality(pair, random_oracle, concepts=["window"], seeds=[0, 1], steps=2,
                                 methods=["echodistill", scoring.IMAGE_PROMPT], images_per_prompt=1,
                                 image_prompt=_adapter(pair.student.unet), log=lambda _: None)
    assert trained == ["echodistill", "echodistill"]  # one per unit, none for the image prompt
    rows = [r for r in report["records"] if r["method"] == scoring.IMAGE_PROMPT]
    assert [(r["concept"], r["seed"], r["train_seconds"]) for r in rows] == [("window", 0, 0.0), ("window", 1, 0.0)]
    summary = {row["method"]: row for row in report["summary"]}
    row = summary[scoring.IMAGE_PROMPT]
    assert row["label"] == "zero-training image prompt (IP-Adapter style), student 1 step" and row["runs"] == 2
    assert row["train_seconds"] == {"mean": 0.0, "std": 0.0}
    full = {r["seed"]: r for r in report["records"] if r["method"] == "echodistill"}
    deltas = [full[r["seed"]]["subject_fidelity"] - r["subject_fidelity"] for r in rows]
    paired = row["reference_minus_this"]
    assert paired["units"] == 2 and paired["reference_wins_subject"] == sum(d > 0 for d in deltas)
    assert paired["subject_fidelity"]["mean"] == pytest.approx(sum(deltas) / 2)
    table = quality_report.markdown(report)
    label = "| zero-training image prompt (IP-Adapter style), student 1 step |"
    assert table.count(label) == 3  # the mean ± std table, the paired table, the per-concept table
    assert "the image prompt's is 0: nothing trains" in table


def test_the_image_prompt_row_reads_the_training_references_with_the_priors_prompts_and_noise(
    tiny_pair_folders, random_oracle
):
    from echodistill.miniworld import CONCEPTS
    from echodistill.training.data import ConceptDataset

    pair = load_model_pair(*tiny_pair_folders)
    adapter = _adapter(pair.student.unet)
    unit = scoring.UnitInputs.build(CONCEPTS["smiley"], 2, 1, captions=True)
    # the pictures it is given are the ones every trained method trains on
    config = methods.method_config("custom_diffusion", "circle", 2, 2)
    trained_on = ConceptDataset.from_config(unit.images, config, pair.vae_downscale).reference_pixel_values()
    torch.testing.assert_close(unit.reference_pixels * 2 - 1, trained_on, atol=1e-6, rtol=0)

    record, images = scoring.score_image_prompt(pair, random_oracle, unit, adapter)
    _, prior = scoring.score_prior(pair, random_oracle, unit)
    assert images.shape == prior.shape == (12, 3, recipe.RESOLUTION, recipe.RESOLUTION)
    prompts = unit.texts_with("")
    assert all(recipe.TOKEN not in text and "circle" in text for text in prompts)
    # with the adapter's scale at 0 the row IS the class-word prior: same prompts, noise, size and sampler
    silent = image_prompt_student(pair, adapter, unit.reference_pixels, prompts, unit.noise_seeds, 0.0,
                                  width=recipe.RESOLUTION, height=recipe.RESOLUTION)
    assert torch.equal(silent, prior)
    assert (images - prior).abs().max() > 1e-3  # the references steer it
    others = image_prompt_student(pair, adapter, unit.reference_pixels.flip(-1).roll(7, dims=-2), prompts,
                                  unit.noise_seeds, width=recipe.RESOLUTION, height=recipe.RESOLUTION)
    assert (images - others).abs().max() > 1e-4  # which references matters
    assert record == {"concept": "smiley", "seed": 2, "method": scoring.IMAGE_PROMPT,
                      **unit.score(random_oracle, images), "train_seconds": 0.0, "seconds_per_step": 0.0}


def test_the_image_prompt_row_without_a_fitting_adapter_fails_before_anything_trains(
    tiny_pair_folders, random_oracle, monkeypatch
):
    from diffusers import UNet2DConditionModel

    pair = load_model_pair(*tiny_pair_folders)
    _forbid_training(monkeypatch)
    common = dict(concepts=["smiley"], seeds=[0], steps=2, methods=["echodistill", scoring.IMAGE_PROMPT],
                  log=lambda _: None)
    with pytest.raises(BenchError, match="the image_prompt row needs the image-prompt adapter"):
        quality.run_quality(pair, random_oracle, **common)
    other = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(16, 32), down_block_types=(
            "CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    with pytest.raises(ImagePromptError, match="other cross-attention layers"):
        quality.run_quality(pair, random_oracle, image_prompt=_adapter(other), **common)


def test_the_token_at_its_starting_row_reads_as_the_class_word_written_in_its_place(tiny_pair_folders):
    from echodistill.models.concept import add_concept_token
    from echodistill.sampling.samplers import sample_student

    pair = load_model_pair(*tiny_pair_folders)
    kwargs = dict(seeds=[2, 2], width=64, height=64)
    plain = sample_student(pair, ["a dog dog on the left", "a dog on the left"], **kwargs).images
    add_concept_token(pair.tokenizer, pair.text_encoder, recipe.TOKEN, "dog")
    with_token = sample_student(pair, [f"a {recipe.TOKEN} dog on the left"], seeds=[2], width=64, height=64).images
    torch.testing.assert_close(with_token[0], plain[0], atol=1e-5, rtol=0)  # batch 1 vs 2: float rounding only
    assert (with_token[0] - plain[1]).abs().max() > 1e-4  # the token is not simply dropped


def test_bad_requests_fail_before_anything_trains(tiny_pair_folders, random_oracle, monkeypatch):
    pair = load_model_pair(*tiny_pair_folders)
    _forbid_training(monkeypatch)
    common = dict(seeds=[0], steps=2, log=lambda _: None)
    with pytest.raises(BenchError, match="methods \\['dreambooth'\\]: give one or more of echodistill, no_echo"):
        quality.run_quality(pair, random_oracle, concepts=["smiley"], methods=["dreambooth"], **common)
    with pytest.raises(BenchError, match="concepts: unknown subject 'dog': use a shipped one \\(checker_diamond"):
        quality.run_quality(pair, random_oracle, concepts=["dog"], methods=["echodistill"], **common)
    # a procedural subject the oracle trained on is no test of personalization
    with pytest.raises(BenchError, match="concepts: .*procedural_2000005.* subject oracle"):
        quality.run_quality(pair, random_oracle, concepts=["procedural_2000005"], methods=["echodistill"], **common)
    with pytest.raises(ConfigError, match="schedule='sequential' needs steps >= 2"):
        quality.run_quality(pair, random_oracle, concepts=["smiley"], methods=["sequential"], seeds=[0], steps=1,
                            log=lambda _: None)


def test_summary_is_mean_and_sample_std_over_concepts_and_seeds():
    records = [
        {"method": scoring.PRIOR, "concept": "a", "seed": 0, "subject_fidelity": 0.2, "prompt_fidelity": 0.5,
         "train_seconds": None, "seconds_per_step": None},
        {"method": "echodistill", "concept": "a", "seed": 0, "subject_fidelity": 0.6, "prompt_fidelity": 0.7,
         "train_seconds": 10.0, "seconds_per_step": 1.0},
        {"method": "echodistill", "concept": "a", "seed": 1, "subject_fidelity": 0.8, "prompt_fidelity": 0.7,
         "train_seconds": 12.0, "seconds_per_step": 1.2},
        {"method": "echodistill", "concept": "b", "seed": 0, "subject_fidelity": 0.4, "prompt_fidelity": 0.4,
         "train_seconds": 14.0, "seconds_per_step": 1.4},
    ]
    prior, full = quality_report.summarize(records, ["echodistill"])
    assert prior["runs"] == 1 and prior["subject_fidelity"] == {"mean": 0.2, "std": 0.0}
    assert prior["train_seconds"] == {"mean": None, "std": None}
    assert full["runs"] == 3
    assert full["subject_fidelity"]["mean"] == pytest.approx(0.6)
    assert full["subject_fidelity"]["std"] == pytest.approx(0.2)  # sample std of 0.6, 0.8, 0.4
    assert full["train_seconds"] == {"mean": pytest.approx(12.0), "std": pytest.approx(2.0)}
    assert full["subject_fidelity_per_concept"] == {"a": pytest.approx(0.7), "b": pytest.approx(0.4)}
    # paired against EchoDistill on the units both have: only concept a, seed 0 for the prior
    assert full["reference_minus_this"] is None
    paired = prior["reference_minus_this"]
    assert paired["units"] == 1 and paired["reference_wins_subject"] == 1
    assert paired["subject_fidelity"] == {"mean": pytest.approx(0.4), "se": 0.0}
    assert paired["prompt_fidelity"]["mean"] == pytest.approx(0.2)
    report = {"settings": {"concepts": ["a", "b"], "seeds": [0, 1], "steps": 10, "images_per_prompt": 1,
                           "student_steps": 1, "teacher_steps": 25, "teacher_guidance": 7.5, "resolution": 64,
                           "fingerprints": {}, "command": "echodistill bench quality --steps 10"},
              "summary": [prior, full]}
    table = quality_report.markdown(report)
    assert "Command: `echodistill bench quality --steps 10`" in table
    assert "| EchoDistill (full), student 1 step | 0.600 ± 0.200 | 0.600 ± 0.173 | 12.0 ± 2.0 | 1.200 ± 0.200 | 3 |" \
        in table
    assert "| EchoDistill (full), student 1 step | 0.700 | 0.400 |" in table
    assert "| class-word prior (untrained student, token removed) | +0.4000 ± 0.0000 | +0.2000 ± 0.0000 | 1/1 |" in table


def test_pairing_by_unit_sees_a_consistent_difference_that_concept_spread_hides():
    records = []
    for unit, level in enumerate([0.1, 0.5, 0.9]):  # concepts far apart, the method always 0.01 behind
        for method, score in (("echodistill", level + 0.01), ("custom_diffusion", level)):
            records.append({"method": method, "concept": f"c{unit}", "seed": 0, "subject_fidelity": score,
                            "prompt_fidelity": 0.5, "train_seconds": 1.0, "seconds_per_step": 0.1})
    paired = quality_report.paired_against_reference(records, "custom_diffusion")
    assert paired["subject_fidelity"]["mean"] == pytest.approx(0.01)
    assert paired["subject_fidelity"]["se"] == pytest.approx(0.0, abs=1e-12)
    assert paired["reference_wins_subject"] == 3 and paired["units"] == 3
    assert quality_report.paired_against_reference(records, "echodistill") is None
    assert quality_report.paired_against_reference(records, "textual_inversion") is None
    # the teacher without echo is paired with the teacher with it, not with the student
    for unit, level in enumerate([0.2, 0.6]):
        for method, score in (("teacher", level + 0.05), ("teacher_no_echo", level)):
            records.append({"method": method, "concept": f"c{unit}", "seed": 0, "subject_fidelity": score,
                            "prompt_fidelity": 0.5, "train_seconds": 1.0, "seconds_per_step": 0.1})
    echo = quality_report.paired_against_reference(records, "teacher_no_echo")
    assert echo["reference"] == "teacher" and echo["units"] == 2
    assert echo["subject_fidelity"]["mean"] == pytest.approx(0.05)
    assert quality_report.paired_against_reference(records, "teacher")["reference"] == "echodistill"


def test_the_teacher_without_echo_row_trains_the_no_echo_run_once_and_draws_its_teacher():
    assert methods.training_runs(["teacher_no_echo"]) == ["no_echo"]
    assert methods.training_runs(["no_echo", "teacher", "teacher_no_echo"]) == ["no_echo", "echodistill"]
    assert methods.rows_served("no_echo", ["no_echo", "teacher", "teacher_no_echo"]) == ["no_echo", "teacher_no_echo"]
    assert methods.prior_rows(["teacher_no_echo"])[-1] == scoring.TEACHER_PRIOR
    assert methods.prior_rows(["no_echo"]) == [scoring.PRIOR, scoring.START_PRIOR]


def test_cli_smoke_on_the_shipped_mini_world(tmp_path, capsys, random_oracle):
    from echodistill.cli import main
    from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR

    if not (TEACHER_DIR / "model_index.json").is_file() or not (STUDENT_DIR / "model_index.json").is_file():
        pytest.skip("the mini-world models are not shipped in this checkout")
    random_oracle.save(tmp_path / "oracle")
    out = tmp_path / "report"
    argv = ["bench", "quality", "--concepts", "crossed_ring", "--seeds", "0", "--steps", "2", "--methods",
            "textual_inversion", "teacher", "--images-per-prompt", "1", "--oracle", str(tmp_path / "oracle"),
            "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "quality.json").read_text())
    command = report["settings"]["command"]
    assert command.startswith("echodistill bench quality --concepts crossed_ring --seeds 0 --steps 2 --methods "
                              "textual_inversion teacher --images-per-prompt 1 --lr-scale echodistill=10 "
                              "custom_diffusion=1 textual_inversion=3 dreambooth_lora=1 --token-lr echodistill=0.001 "
                              "custom_diffusion=0 --oracle ")
    assert report["settings"]["lr_scales"] == recipe.TUNED_LR_SCALES and report["settings"]["captions"] is True
    assert report["settings"]["token_lrs"] == recipe.TUNED_TOKEN_LRS
    assert report["settings"]["caption_states"] == ["bg_color", "bg_pattern"]
    assert {r["method"] for r in report["records"]} == {scoring.PRIOR, scoring.START_PRIOR, scoring.TEACHER_PRIOR,
                                                        "textual_inversion",
                                                        "teacher"}
    assert set(report["settings"]["oracle"]["digests"]) == {"attribute_reader.safetensors",
                                                            "subject_encoder.safetensors"}
    printed = capsys.readouterr().out
    assert command in printed and "| Textual Inversion on the student |" in printed


def test_cli_image_prompt_row_reads_the_adapter_beside_the_oracle_on_the_shipped_mini_world(
    tmp_path, capsys, random_oracle
):
    from echodistill.cli import build_parser, main
    from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR
    from echodistill.miniworld.image_prompt import adapter_path

    # by default the table leaves the row out: its adapter is not shipped
    assert build_parser().parse_args(["bench", "quality"]).methods == list(methods.DEFAULT_METHODS)
    assert scoring.IMAGE_PROMPT not in methods.DEFAULT_METHODS
    if not (TEACHER_DIR / "model_index.json").is_file() or not (STUDENT_DIR / "model_index.json").is_file():
        pytest.skip("the mini-world models are not shipped in this checkout")
    random_oracle.save(tmp_path / "oracle")
    path = _adapter(load_model_pair(TEACHER_DIR, STUDENT_DIR).student.unet).save(adapter_path(tmp_path / "oracle"))
    assert path == tmp_path / "image_prompt" / "image_prompt_adapter.safetensors"
    out = tmp_path / "report"
    argv = ["bench", "quality", "--concepts", "crossed_ring", "--seeds", "0", "--methods", "image_prompt",
            "--images-per-prompt", "1", "--oracle", str(tmp_path / "oracle"), "--out", str(out), "--threads", "1"]
    assert main(argv) == 0  # nothing trains: the priors and the image prompt are sampled and scored
    report = json.loads((out / "quality.json").read_text())
    assert [r["method"] for r in report["records"]] == [scoring.PRIOR, scoring.START_PRIOR, scoring.IMAGE_PROMPT]
    assert report["settings"]["image_prompt"]["path"] == str(path)
    assert f"--oracle {tmp_path / 'oracle'} --image-prompt {path} --out" in report["settings"]["command"]
    table = (out / "quality.md").read_text()
    assert f"- image-prompt adapter (the zero-training row, trained once on procedural subjects, none of the " \
           f"table's): `{path}` ({report['settings']['image_prompt']['digest']})" in table
    assert "| zero-training image prompt (IP-Adapter style), student 1 step |" in capsys.readouterr().out


def test_cli_a_missing_image_prompt_adapter_is_one_line_naming_the_command_that_builds_it(
    tmp_path, capsys, random_oracle
):
    from echodistill.cli import main

    random_oracle.save(tmp_path / "oracle")
    out = tmp_path / "report"
    argv = ["bench", "quality", "--methods", "echodistill", "image_prompt", "--oracle", str(tmp_path / "oracle"),
            "--out", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error == (f"error: image-prompt adapter {tmp_path}/image_prompt/image_prompt_adapter.safetensors does not "
                     "exist: build it with `.venv/bin/python scripts/train_miniworld.py --image-prompt-only "
                     f"--oracle-to {tmp_path}/oracle`, or leave image_prompt out of --methods\n")
    assert main([*argv, "--image-prompt", str(tmp_path / "nowhere.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --image-prompt {tmp_path}/nowhere.safetensors does not exist: give the file "
                            "`.venv/bin/python scripts/train_miniworld.py --image-prompt-only --oracle-to ORACLE` "
                            "writes") and error.count("\n") == 1
    assert not out.exists()


def test_learning_rate_scales_multiply_each_familys_published_rates_and_ablations_follow_echodistill():
    base = methods.method_config("no_echo", "ring", 10, 0)
    scaled = methods.method_config("no_echo", "ring", 10, 0, lr_scale=3.0)
    assert scaled.lr_student == pytest.approx(3 * base.lr_student)
    assert scaled.lr_teacher == pytest.approx(3 * base.lr_teacher)
    assert scaled.lr_heads == base.lr_heads  # heads start from scratch at any model size
    ti = methods.method_config("textual_inversion", "ring", 10, 0, lr_scale=0.5)
    assert ti.lr_student == pytest.approx(0.5 * 5e-3)
    assert [methods.lr_family(m) for m in ("sequential", "teacher", "dreambooth_lora")] == [
        "echodistill", "echodistill", "dreambooth_lora"]
    assert methods.parse_lr_scales(["echodistill=1", "textual_inversion=0.3"]) == {
        **recipe.TUNED_LR_SCALES, "echodistill": 1.0, "textual_inversion": 0.3}
    assert methods.parse_lr_scales([]) == recipe.TUNED_LR_SCALES and set(recipe.TUNED_LR_SCALES) == set(
        methods.LR_FAMILIES)
    for bad in ("no_echo=3", "echodistill", "echodistill=0", "echodistill=x"):
        with pytest.raises(BenchError, match="write FAMILY=FACTOR"):
            methods.parse_lr_scales([bad])


def test_token_rates_reach_the_token_row_of_the_families_that_train_one():
    assert methods.method_config("no_echo", "ring", 10, 0).lr_token == 0.0  # the adapters' rate, as published
    assert methods.method_config("sequential", "ring", 10, 0, lr_scale=3.0, token_lr=1e-3).lr_token == 1e-3
    custom = methods.method_config("custom_diffusion", "ring", 10, 0, lr_scale=2.0, token_lr=3e-4)
    assert (custom.lr_student, custom.lr_token) == (pytest.approx(2e-5), 3e-4)
    assert methods.parse_token_lrs(["echodistill=1e-3"]) == {**recipe.TUNED_TOKEN_LRS, "echodistill": 1e-3}
    assert set(recipe.TUNED_TOKEN_LRS) == set(methods.TOKEN_LR_FAMILIES) <= set(methods.LR_FAMILIES)
    assert recipe.tuned_config("ring", 10, 0).lr_token == recipe.TUNED_TOKEN_LRS["echodistill"]
    for bad in ("textual_inversion=1e-3", "echodistill", "echodistill=-1", "echodistill=2", "echodistill=x"):
        with pytest.raises(BenchError, match="--token-lr .*: write FAMILY=RATE with a rate from 0"):
            methods.parse_token_lrs([bad])


def test_the_mini_worlds_echo_draws_its_own_scenes_and_none_the_evaluation_shows():
    from echodistill.miniworld import CONCEPTS
    from echodistill.miniworld.concepts import evaluation_prompts

    config = recipe.tuned_config("diamond", 400, 0)
    assert config.echo_prompts == recipe.ECHO_PROMPTS and len(config.echo_prompts) == 174
    assert all(p.startswith("a ") and p.count("{}") == 1 and p.endswith(" background") for p in config.echo_prompts)
    scenes = {p.replace("{}", f"<v*> {c.class_word}") for p in config.echo_prompts for c in CONCEPTS.values()}
    shown = {e.text.replace("{token}", "<v*>") for c in CONCEPTS.values() for e in evaluation_prompts(c)}
    assert not scenes & shown  # the evaluation's scenes are never echoed into training
    assert methods.method_config("custom_diffusion", "ring", 10, 0).echo_prompts != config.echo_prompts  # no echo


def test_captioned_references_train_on_the_worlds_grammar_with_the_token():
    from echodistill.miniworld import CONCEPTS
    from echodistill.training.data import ConceptDataset

    unit = scoring.UnitInputs.build(CONCEPTS["window"], 0, 1, captions=True)
    # each states its background, true under mirror images and zoomed-in crops; neither the position (a mirror
    # image swaps it) nor the size (measured: the finished world's teacher learns subjects better without it)
    assert [image.caption for image in unit.images] == [
        "a {} on a plain red background", "a {} on a plain yellow background",
        "a {} on a plain green background", "a {} on a plain blue background",
        "a {} on a plain black background"]
    dataset = ConceptDataset(unit.images, token=recipe.TOKEN, class_word="square", resolution=64, latent_scale=4)
    batch = dataset.sample_batch(16, torch.Generator().manual_seed(0))
    assert all(re.search(r"\ba <v\*> square on a plain ", prompt) and "photo" not in prompt
               for prompt in batch.prompts)
    templated = scoring.UnitInputs.build(CONCEPTS["window"], 0, 1, captions=False)
    assert all(image.caption is None for image in templated.images)


def _fake_report(folder, concepts, seeds, **changes):
    records = [{"concept": c, "seed": s, "method": m, "subject_fidelity": 0.1 * (s + 1),
                "prompt_fidelity": 0.9, "train_seconds": 1.0, "seconds_per_step": 0.1}
               for c in concepts for s in seeds for m in (scoring.PRIOR, "echodistill")]
    settings = {"concepts": concepts, "seeds": seeds, "steps": 10, "methods": ["echodistill"],
                "images_per_prompt": 1, "student_steps": 1, "teacher_steps": 25, "teacher_guidance": 7.5,
                "resolution": 64, "fingerprints": {"vae": "abc"}, "command": f"run {folder.name}", **changes}
    folder.mkdir(parents=True)
    (folder / "quality.json").write_text(json.dumps({"settings": settings, "records": records}))


def test_runs_made_side_by_side_merge_into_one_table_and_mismatches_are_refused(tmp_path):
    _fake_report(tmp_path / "s0", ["a", "b"], [0])
    _fake_report(tmp_path / "s1", ["a", "b"], [1])
    merged = quality_report.merge_reports([tmp_path / "s0", tmp_path / "s1"], tmp_path / "all")
    assert merged["settings"]["seeds"] == [0, 1] and merged["settings"]["concepts"] == ["a", "b"]
    full = next(row for row in merged["summary"] if row["method"] == "echodistill")
    assert full["runs"] == 4 and full["subject_fidelity"]["mean"] == pytest.approx(0.15)
    table = (tmp_path / "all" / "quality.md").read_text()
    assert "- `run s0`" in table and "- `run s1`" in table
    assert json.loads((tmp_path / "all" / "quality.json").read_text())["records"] == merged["records"]

    _fake_report(tmp_path / "other", ["c"], [0], steps=20)
    with pytest.raises(BenchError, match="other settings \\(steps\\)"):
        quality_report.merge_reports([tmp_path / "s0", tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(BenchError, match="repeats a seed 0"):
        quality_report.merge_reports([tmp_path / "s0", tmp_path / "s0"], tmp_path / "bad")
    with pytest.raises(BenchError, match="does not exist"):
        quality_report.merge_reports([tmp_path / "s0", tmp_path / "missing"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
