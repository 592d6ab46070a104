"""The fleet: a manifest checked as a whole, and concepts trained on a local Ray cluster of 2 CPU slots.

Tiny random pair, 64 px, a few steps per concept. Every wait is bounded: the fleet's own timeout
and pytest's per-call limits on `ray.get`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from echodistill.cli import main
from echodistill.concepts.bundle import ConceptBundle
from echodistill.errors import ConfigError
from echodistill.fleet.manifest import load_manifest

STEPS = 4
FLEET_TIMEOUT_S = 240.0
SHARED = dict(preset="paper", steps=STEPS, resolution=64)
CONFIG = dict(batch_size=2, echo_start=2, echo_every=2, echo_samples=4, echo_keep_ratio=0.5, sample_every=0,
              save_every=2, log_every=1, ms_swd_projections=8, ms_swd_scales=2)


def _photos(folder: Path, shade: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        picture = Image.new("RGB", (64, 64), (200, shade + 30 * i, 60))
        picture.paste((20, 20, 220), (16 + 4 * i, 16, 40 + 4 * i, 48))
        picture.save(folder / f"{i}.png")
    return folder


def _refused(manifest: Path) -> str:
    """The message of the ConfigError that loading `manifest` must raise."""
    with pytest.raises(ConfigError) as info:
        load_manifest(manifest)
    return str(info.value)


def _toml(value) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists of them are the same in TOML


def _write_manifest(path: Path, pair, concepts: list[dict], shared: dict | None = None,
                    config: dict | None = None) -> Path:
    lines = [f"teacher = {_toml(str(pair[0]))}", f"student = {_toml(str(pair[1]))}"]
    lines += [f"{k} = {_toml(v)}" for k, v in (shared or SHARED).items()]
    lines += ["[config]"] + [f"{k} = {_toml(v)}" for k, v in (config or CONFIG).items()]
    for concept in concepts:
        own = concept.get("config", {})
        lines += ["[[concept]]"] + [f"{k} = {_toml(v)}" for k, v in concept.items() if k != "config"]
        if own:
            lines += ["[concept.config]"] + [f"{k} = {_toml(v)}" for k, v in own.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the manifest, no Ray needed --------------------------------------------------------------------


def test_manifest_lists_every_problem_at_once(tiny_pair_folders, tmp_path):
    good = _photos(tmp_path / "good", 40)
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [
        {"name": "a", "photos": str(good), "class_word": "dog"},
        {"name": "a", "photos": str(good), "class_word": "dog"},  # duplicate output
        {"name": "../escape", "photos": str(good), "class_word": "dog"},
        {"name": "b", "photos": "missing-folder", "class_word": "dog"},
        {"name": "c", "photos": str(good), "class_word": "dog", "config": {"lr_studnet": 1e-4}},
        {"name": "d", "photos": str(good), "class_word": "dog", "config": {"resolution": 100}},
        {"name": "e", "photos": "miniworld/no_such_subject"},
        {"name": "f", "photos": "missing-too", "config": {"steps": 0}},  # three at once, each listed
    ])
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "9 problem(s)" in message, message
    assert "'f': photos folder" in message and "'f': `class_word` is missing" in message and "'f': steps=0" in message
    for expected in ("concept 'a': duplicate output name", "name '../escape' cannot be used",
                     "missing-folder does not exist",
                     "unknown config key 'lr_studnet' (did you mean lr_student?)",
                     "resolution=100 must be a multiple of 64", "unknown subject 'no_such_subject'"):
        assert expected in message, message


def test_manifest_refuses_empty_photo_folders_and_miscounted_captions_and_names_a_bad_preset_once(
        tiny_pair_folders, tmp_path):
    good, empty = _photos(tmp_path / "good", 40), tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photo here")
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [
        {"name": "a", "photos": str(empty), "class_word": "dog"},
        {"name": "b", "photos": str(good), "class_word": "dog", "captions": ["a photo of a <v*> dog"] * 2},
        {"name": "c", "photos": str(good), "class_word": "dog", "config": {"lr_student": 5.0, "batch_size": 0}},
    ], shared={**SHARED, "preset": "fastest"})
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "5 problem(s)" in message, message
    assert message.count("preset 'fastest' is unknown") == 1, message
    assert f"concept 'a': no usable image in folder {str(empty)!r}" in message, message
    assert "concept 'b': `captions` lists 2 caption(s) for 3 photo(s)" in message, message
    # each config problem on its own line, naming its concept
    assert "concept 'c': batch_size=0 must be at least 1" in message, message
    assert "concept 'c': lr_student=5.0 must be at most 1" in message, message
    nameless = _write_manifest(tmp_path / "nameless.toml", tiny_pair_folders, [
        {"photos": str(good), "class_word": "dog"}, {"name": "fleet-state.json", "photos": str(good), "class_word": "dog"}])
    with pytest.raises(ConfigError) as info:  # no KeyError: a missing name is one more problem
        load_manifest(nameless)
    assert "concept #1: a concept needs a non-empty string `name`" in str(info.value), str(info.value)
    assert "name 'fleet-state.json' is the fleet's own file" in str(info.value), str(info.value)
    latin = tmp_path / "latin.toml"
    latin.write_bytes("teacher = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.toml is not UTF-8 text"):
        load_manifest(latin)


def test_manifest_builds_each_concepts_config_and_knows_the_mini_world(tiny_pair_folders, tmp_path):
    good = _photos(tmp_path / "good", 40)
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [
        {"name": "a", "photos": "good", "token": "<a*>", "class_word": "dog", "config": {"seed": 7}},
        {"name": "smiley", "photos": "miniworld/smiley"},
        {"name": "proc", "photos": "miniworld/procedural_3", "captions": ["{}"] * 5},
    ])
    manifest = load_manifest(path)
    a, smiley, proc = manifest.concepts
    assert a.photos == str(good) and a.config.token == "<a*>" and a.config.seed == 7
    assert a.config.save_every == 2 and a.config.steps == STEPS and a.subject is None
    assert smiley.subject == "smiley" and smiley.config.class_word and len(smiley.captions) == 5
    assert proc.subject == "procedural_3" and proc.captions == ("{}",) * 5


def test_manifest_refuses_a_photos_folder_with_fewer_than_three_photos(tiny_pair_folders, tmp_path):
    two = _photos(tmp_path / "two", 40)
    (two / "2.png").unlink()
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [{"name": "a", "photos": "two",
                                                                         "class_word": "dog"}])
    with pytest.raises(ConfigError, match=r"concept 'a': .*two holds 2 photo\(s\), but a concept is learned from 3 "
                                          r"to 20: add at least 1 more"):
        load_manifest(path)


def test_manifest_refuses_a_shared_value_given_twice_and_warns_of_more_than_twenty_photos(tiny_pair_folders,
                                                                                        tmp_path):
    from echodistill.training.photos import PhotoCountWarning

    many = _photos(tmp_path / "many", 40)
    for i in range(3, 21):
        (many / f"{i}.png").write_bytes((many / "0.png").read_bytes())
    concepts = [{"name": "a", "photos": "many", "class_word": "dog"}]
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, concepts, config={**CONFIG, "steps": 7})
    with pytest.raises(ConfigError, match=rf"top-level `steps = {STEPS}` and \[config\] `steps = 7`: two values for "
                                          r"steps; give it once"), pytest.warns(PhotoCountWarning):
        load_manifest(path)
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, concepts)
    with pytest.warns(PhotoCountWarning, match="many holds 21 photos, more than the 3-20"):
        assert len(load_manifest(path).concepts) == 1


def test_a_shared_class_word_serves_every_concept_without_its_own(tiny_pair_folders, tmp_path):
    _photos(tmp_path / "good", 40)
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [
        {"name": "a", "photos": "good"}, {"name": "b", "photos": "good", "class_word": "cat"},
        {"name": "smiley", "photos": "miniworld/smiley"}], config={**CONFIG, "class_word": "dog"})
    a, b, smiley = load_manifest(path).concepts
    assert (a.config.class_word, b.config.class_word) == ("dog", "cat")
    assert smiley.config.class_word == "circle"  # a mini-world subject's own class word is more specific


def test_manifest_presets_follow_the_teachers_model_line(tiny_pair_folders, tiny_sdxl_folders, tmp_path):
    _photos(tmp_path / "good", 40)
    concepts = [{"name": "a", "photos": "good", "class_word": "dog"},
                {"name": "b", "photos": "good", "class_word": "dog", "config": {"adapter": "custom_diffusion"}}]
    shared = {**SHARED, "preset": "lite"}
    sdxl = load_manifest(_write_manifest(tmp_path / "xl.toml", tiny_sdxl_folders, concepts, shared))
    assert [c.config.adapter for c in sdxl.concepts] == ["lora", "custom_diffusion"]  # SDXL lite; the user's wins
    sd = load_manifest(_write_manifest(tmp_path / "sd.toml", tiny_pair_folders, concepts, shared))
    assert [c.config.adapter for c in sd.concepts] == ["custom_diffusion", "custom_diffusion"]
    mixed = _write_manifest(tmp_path / "mixed.toml", (tiny_pair_folders[0], tiny_sdxl_folders[1]), concepts, {
        **shared, "dtype": "fp8", "student_family": 5})
    with pytest.raises(ConfigError) as info:
        load_manifest(mixed)
    for expected in ("cannot share a text encoder", "dtype: ", "`student_family` must be a string, got 5"):
        assert expected in str(info.value), str(info.value)
    long_name = [{"name": "a" * 300, "photos": "good", "class_word": "dog"}]
    with pytest.raises(ConfigError, match="cannot be used"):
        load_manifest(_write_manifest(tmp_path / "long.toml", tiny_pair_folders, long_name, shared))
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="teacher: "):
        load_manifest(_write_manifest(tmp_path / "bad.toml", (not_a_model, tiny_pair_folders[1]), concepts, shared))


MINIWORLD_PAIR = ("miniworld/teacher", "miniworld/student")


def test_a_bad_shared_value_is_named_once_as_the_shared_keys_problem(tmp_path):
    concepts = [{"name": name, "photos": "miniworld/smiley"} for name in ("a", "b", "c")]
    zero = _write_manifest(tmp_path / "zero.toml", MINIWORLD_PAIR, concepts, shared={**SHARED, "steps": 0})
    with pytest.raises(ConfigError) as info:
        load_manifest(zero)
    message = str(info.value)
    assert "1 problem(s)" in message, message
    assert "  - top-level `steps` (every concept's): steps=0 must be at least 1" in message, message
    assert "concept '" not in message, message  # not once per concept
    shared_config = _write_manifest(tmp_path / "shared.toml", MINIWORLD_PAIR, [
        *concepts, {"name": "d", "photos": "miniworld/smiley", "config": {"lr_student": 5.0}},
        {"name": "e", "photos": "miniworld/smiley", "config": {"batch_size": 0}}],
        config={**CONFIG, "batch_size": 0})
    with pytest.raises(ConfigError) as info:
        load_manifest(shared_config)
    message = str(info.value)
    assert "3 problem(s)" in message, message
    assert "  - [config]: batch_size=0 must be at least 1" in message, message
    # a concept's own values: still listed, the same value included
    assert "  - concept 'd': lr_student=5.0 must be at most 1" in message, message
    assert "  - concept 'e': batch_size=0 must be at least 1" in message, message
    fixed = _write_manifest(tmp_path / "fixed.toml", MINIWORLD_PAIR, [
        {"name": "a", "photos": "miniworld/smiley", "config": {"steps": 3}}], shared={**SHARED, "steps": 0})
    with pytest.raises(ConfigError) as info:  # the shared value is still wrong, even where a concept sets its own
        load_manifest(fixed)
    assert "1 problem(s)" in str(info.value) and "top-level `steps`" in str(info.value), str(info.value)


def test_shared_values_of_the_wrong_type_are_listed_with_no_valid_concept(tmp_path):
    shared = {**SHARED, "steps": "ten", "resolution": 100, "seed": "x"}
    for concepts, concept_problem in (
            ([], "the manifest lists no concepts: add [[concept]] tables"),
            ([{"name": "../up", "photos": "miniworld/no_such_subject"}], "unknown subject 'no_such_subject'")):
        path = _write_manifest(tmp_path / "fleet.toml", MINIWORLD_PAIR, concepts, shared=shared,
                               config={**CONFIG, "batch_size": 0})
        message = _refused(path)
        for expected in ("  - top-level `steps` (every concept's): steps='ten' must be a whole number",
                         "  - top-level `seed` (every concept's): seed='x' must be a whole number",
                         # range problems too: a bad type elsewhere hides none
                         "  - top-level `resolution` (every concept's): resolution=100 must be a multiple of 64",
                         "  - [config]: batch_size=0 must be at least 1", concept_problem):
            assert message.count(expected) == 1, message
    single = tmp_path / "single.toml"  # [concept] where [[concept]] was meant: a wrong type, not "no concepts"
    single.write_text('teacher = "miniworld/teacher"\nstudent = "miniworld/student"\nsteps = "ten"\n'
                      '[concept]\nname = "a"\nphotos = "miniworld/smiley"\n')
    with pytest.raises(ConfigError) as info:
        load_manifest(single)
    message = str(info.value)
    assert "2 problem(s)" in message and "steps='ten' must be a whole number" in message, message
    assert "`concept` is a single table: write each concept as [[concept]] (two brackets), not [concept]" in message


def test_a_value_of_the_wrong_type_is_named_as_such_not_as_missing(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('teacher = 5\nstudent = ["miniworld/student"]\n'
                    '[[concept]]\nname = 7\nphotos = 3\nclass_word = "dog"\n'
                    '[[concept]]\nname = "b"\nphotos = "miniworld/smiley"\n')
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "4 problem(s)" in message and "missing" not in message, message
    for expected in ("`teacher` must be a path string in quotes (a checkpoint, a diffusers folder or "
                     "miniworld/teacher), got 5",
                     "`student` must be a path string in quotes (a checkpoint, a diffusers folder or "
                     "miniworld/student), got ['miniworld/student']",
                     "concept #1: `name` must be a string in quotes (the output folder's name), got 7",
                     "concept #1: `photos` must be a path string in quotes (a folder of photos or "
                     "miniworld/<subject>), got 3"):
        assert expected in message, message
    path.write_text('student = "miniworld/student"\n[[concept]]\nphotos = "miniworld/smiley"\n')
    with pytest.raises(ConfigError) as info:  # absent is still "missing"
        load_manifest(path)
    assert "`teacher` is missing" in str(info.value) and "needs a non-empty string `name`" in str(info.value)


def test_fleet_run_check_refuses_a_mini_world_subject_with_miscounted_captions(tmp_path, capsys):
    path = _write_manifest(tmp_path / "fleet.toml", MINIWORLD_PAIR, [
        {"name": "a", "photos": "miniworld/smiley", "captions": ["a {} on a plain red background"] * 2},
        {"name": "b", "photos": "miniworld/procedural_3", "captions": ["{}"] * 6},
        {"name": "c", "photos": "miniworld/window", "captions": ["{}"] * 5}])  # one per reference: fine
    assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "Traceback" not in err, err
    assert ("  - concept 'a': `captions` lists 2 caption(s) for the 5 references of mini-world subject "
            "'miniworld/smiley': give one per reference, or leave `captions` out for the world's own grammar "
            "captions") in err, err
    assert "  - concept 'b': `captions` lists 6 caption(s) for the 5 references" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role, file, text", [("teacher", "model_index.json", "garbage{"),
                                              ("student", "scheduler/scheduler_config.json", "[1, 2]"),
                                              ("teacher", "scheduler/scheduler_config.json", "{")])
def test_fleet_run_check_refuses_a_damaged_config_as_train_does(role, file, text, tiny_pair_folders, tmp_path,
                                                               capsys):
    """Configs only training reads (the teacher's model_index.json, each scheduler config): loading the pair
    passes, `train` fails; `fleet run --check` refuses them with train's own message."""
    import shutil

    good = _photos(tmp_path / "good", 40)
    pair = dict(zip(("teacher", "student"), tiny_pair_folders))
    pair[role] = shutil.copytree(pair[role], tmp_path / role)
    (pair[role] / file).write_text(text)
    assert main(["train", "--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--images", str(good),
                 "--class-word", "dog", "--steps", "2", "--resolution", "64", "--run-dir", str(tmp_path / "run"),
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    train_error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(train_error) == 1 and str(pair[role] / file) in train_error[0], train_error
    path = _write_manifest(tmp_path / "fleet.toml", (pair["teacher"], pair["student"]),
                           [{"name": "a", "photos": str(good), "class_word": "dog"}])
    assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "Traceback" not in err, err
    assert f"  - {role}: {train_error[0].removeprefix('error: ')}" in err, err
    assert not (tmp_path / "out").exists()


def test_the_shipped_example_manifest_is_valid():
    root = Path(__file__).resolve().parents[1]
    manifest = load_manifest(root / "docs" / "fleet-miniworld.toml")
    assert len(manifest.concepts) >= 3 and all(c.subject for c in manifest.concepts)
    assert all(path.is_dir() for path in manifest.model_paths())


# --- on a local Ray cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="the fleet runs on Ray: pip install 'ray>=2.9' (the fleet extra)")
    from echodistill.fleet.engine import start_ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray's socket paths must stay short (107 bytes): a short folder under pytest's base temp.
    start_ray(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


def _run(manifest, out, **options):
    from echodistill.fleet.engine import FleetOptions, run_fleet

    on_event = options.pop("on_event", None)
    options = FleetOptions(**{"workers": 2, "timeout_s": FLEET_TIMEOUT_S, **options})
    return run_fleet(load_manifest(manifest), out, options, on_event=on_event, progress_bar=False)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    bundle = ConceptBundle.load(path)
    tensors = {"embedding": bundle.embedding}
    tensors.update({f"student.{k}": v for k, v in bundle.student_adapter.items()})
    tensors.update({f"teacher.{k}": v for k, v in bundle.teacher_adapter.items()})
    return tensors


def test_two_workers_train_three_concepts_report_a_bad_folder_and_a_rerun_skips(
        ray_cluster, tiny_pair_folders, tmp_path, capsys):
    concepts = [{"name": f"c{i}", "photos": str(_photos(tmp_path / f"p{i}", 40 * i)), "class_word": "dog"}
                for i in range(3)]
    bad = tmp_path / "bad"
    _photos(bad, 0)
    (bad / "1.png").write_bytes(b"not a picture")
    concepts.append({"name": "bad", "photos": str(bad), "class_word": "dog"})
    manifest = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, concepts)
    out = tmp_path / "out"

    state = _run(manifest, out)
    records = state.concepts
    for i in range(3):
        record = records[f"c{i}"]
        assert record["status"] == "done" and record["steps"] == STEPS and record["attempts"] == 1, record
        assert ConceptBundle.load(record["bundle"]).step == STEPS
    assert records["bad"]["status"] == "failed" and records["bad"]["attempts"] == 1, records["bad"]
    assert "DataError" in records["bad"]["error"] and "1.png" in records["bad"]["error"]
    assert len({records[f"c{i}"]["worker"] for i in range(3)} | {records["bad"]["worker"]}) == 2  # two slots
    # each worker loaded the pair once and trained one concept after another on it
    assert {r["pair_loads"] for r in records.values()} == {1}
    assert max(r["job_on_pair"] for r in records.values()) >= 2
    saved = json.loads((out / "fleet-state.json").read_text())
    assert saved["concepts"]["c0"]["status"] == "done"

    stamp = (out / "c0" / "concept.safetensors").stat().st_mtime_ns
    other_models = ConceptBundle.load(out / "c1" / "concept.safetensors")
    other_models.fingerprints = {part: "0" * len(value) for part, value in other_models.fingerprints.items()}
    other_models.save(out / "c1" / "concept.safetensors")  # loads, finished, but for other base models
    (out / "c2" / "concept.safetensors").write_bytes(b"torn")  # present but not loadable
    again = _run(manifest, out).concepts
    assert [again[f"c{i}"]["status"] for i in range(3)] == ["skipped", "done", "done"]
    assert (out / "c0" / "concept.safetensors").stat().st_mtime_ns == stamp
    assert "BundleMismatchError" in again["c1"]["note"] and again["c1"]["resumed_from"] == STEPS
    assert again["c2"]["resumed_from"] == STEPS  # both from their final checkpoints: nothing to train again
    assert again["bad"]["status"] == "failed"

    assert main(["fleet", "status", "--out", str(out)]) == 0
    assert "c0" in capsys.readouterr().out
    assert main(["fleet", "report", "--out", str(out)]) == 0
    rows = json.loads((out / "fleet-report.json").read_text())
    assert {row["concept"]: row["status"] for row in rows}["c2"] == "done"
    assert "| c0 | skipped |" in (out / "fleet-report.md").read_text()


def test_a_killed_worker_is_retried_and_resumes_to_the_uninterrupted_bundle(ray_cluster, tiny_pair_folders,
                                                                            tmp_path):
    from echodistill.jobs.runs import train_concept
    from echodistill.models.pair import load_model_pair

    steps = 8
    concepts = [{"name": f"k{i}", "photos": str(_photos(tmp_path / f"p{i}", 50 * i)), "class_word": "dog"}
                for i in range(2)]
    concepts[1]["config"] = {"steps": 2}  # short: its worker is free when k0's worker is lost
    manifest = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, concepts,
                               shared={**SHARED, "steps": steps})
    killed = {}

    def kill_once(name, record):  # past the checkpoint of step 4 (k1 has finished by then), before the end
        if name == "k0" and not killed and record.get("status") == "training" and 5 <= record.get("step", 0) < steps:
            killed.update(pid=record["pid"], step=record["step"])
            os.kill(record["pid"], signal.SIGKILL)

    records = _run(manifest, tmp_path / "out", on_event=kill_once, poll_s=0.05).concepts
    assert killed, "the worker finished before it could be killed"
    k0 = records["k0"]
    assert k0["status"] == "done" and k0["attempts"] == 2 and k0["lost"] == 1, k0
    assert 4 <= k0["resumed_from"] < steps and k0["pid"] != killed["pid"]
    assert k0["pid"] == records["k1"]["pid"]  # retried on the worker that was still alive
    assert records["k1"]["status"] == "done"

    job = load_manifest(manifest).concepts[0]
    reference = train_concept(load_model_pair(*tiny_pair_folders), job.photos, job.config,
                              run_dir=tmp_path / "uninterrupted").bundle
    reference_path = reference.save(tmp_path / "uninterrupted.safetensors")
    expected, got = _tensors(reference_path), _tensors(Path(k0["bundle"]))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_workers_that_cannot_load_the_models_stop_the_fleet_with_the_loaders_message(ray_cluster, tiny_pair_folders,
                                                                                      tmp_path):
    import shutil

    from echodistill.errors import EchoDistillError
    from echodistill.fleet.engine import FleetError

    from safetensors.torch import load_file, save_file

    teacher = shutil.copytree(tiny_pair_folders[0], tmp_path / "teacher")
    weights = next((teacher / "unet").glob("*.safetensors"))
    kept = {k: v for k, v in load_file(weights).items() if k != "conv_out.weight"}
    save_file(kept, str(weights))  # every header reads (the manifest check passes); loading finds a tensor missing
    manifest = _write_manifest(tmp_path / "fleet.toml", (teacher, tiny_pair_folders[1]),
                               [{"name": "a", "photos": str(_photos(tmp_path / "p", 40)), "class_word": "dog"}])
    with pytest.raises(FleetError, match="no worker could load the base models") as caught:
        _run(manifest, tmp_path / "out")
    message = str(caught.value)
    assert "conv_out.weight" in message and "no worker left" not in message, message
    assert "\n" not in message and "Traceback" not in message
    assert isinstance(caught.value, EchoDistillError)  # the command line prints it in one line, exit 2
    state = json.loads((tmp_path / "out" / "fleet-state.json").read_text())["concepts"]["a"]
    assert state["status"] == "failed" and "conv_out.weight" in state["error"]  # what `fleet status` shows
    assert state["attempts"] == 0  # nothing was tried: a rerun with good models queues and trains it


def test_fleet_run_check_validates_without_training(tiny_pair_folders, tmp_path, capsys, monkeypatch):
    good = _photos(tmp_path / "good", 40)
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders,
                           [{"name": "a", "photos": str(good), "class_word": "dog"}])
    for flag, message in (("--workers", "1 to 1,024 worker slots"), ("--threads", "1 to 1,024 CPU threads per worker"),
                          ("--max-attempts", "1 to 100 tries per concept")):
        assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check", flag, "0"]) == 2
        assert capsys.readouterr().err == f"error: {flag} 0: give {message}\n"
    assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "1 concepts" in printed and "the pair loads" in printed and not (tmp_path / "out").exists()
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 0  # the manifest is fine
    assert capsys.readouterr().err.startswith("warning: the fleet needs Ray, which this Python does not have: ")
    broken = _write_manifest(tmp_path / "broken.toml", tiny_pair_folders, [{"name": "a", "photos": "nowhere"}])
    assert main(["fleet", "run", str(broken), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "2 problem(s)" in error and "does not exist" in error and "class_word" in error
    import shutil

    teacher = shutil.copytree(tiny_pair_folders[0], tmp_path / "torn_teacher")
    weights = next((teacher / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:2000])  # its configs read; its weights do not
    torn = _write_manifest(tmp_path / "torn.toml", (teacher, tiny_pair_folders[1]),
                           [{"name": "a", "photos": str(good), "class_word": "dog"}])
    assert main(["fleet", "run", str(torn), "--out", str(tmp_path / "out"), "--check"]) == 2
    assert f"teacher: {weights} is not a readable safetensors file" in capsys.readouterr().err
    from safetensors.torch import load_file, save_file

    missing = shutil.copytree(tiny_pair_folders[0], tmp_path / "missing_teacher")
    weights = next((missing / "unet").glob("*.safetensors"))
    save_file({k: v for k, v in load_file(weights).items() if k != "conv_out.weight"}, str(weights))
    lacking = _write_manifest(tmp_path / "lacking.toml", (missing, tiny_pair_folders[1]),
                              [{"name": "a", "photos": str(good), "class_word": "dog"}])
    assert main(["fleet", "run", str(lacking), "--out", str(tmp_path / "out"), "--check"]) == 2  # headers read; the
    error = capsys.readouterr().err  # load the workers would do finds the tensor missing, before any Ray starts
    assert "conv_out.weight" in error and "Traceback" not in error and not (tmp_path / "out").exists()


def test_a_bundle_finished_before_a_config_field_existed_is_still_finished(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from echodistill.fleet import engine
    from echodistill.fleet.manifest import ConceptJob
    from echodistill.training.config import TrainConfig

    config = TrainConfig(steps=3, class_word="mug", echo=False)
    written_before = {k: v for k, v in config.to_dict().items() if k != "lr_token"}  # a bundle older than the field
    path = tmp_path / "concept.safetensors"
    path.write_bytes(b"stands for a bundle")
    monkeypatch.setattr(engine.ConceptBundle, "load", lambda p: SimpleNamespace(step=3, config=written_before))
    assert engine.bundle_is_finished(ConceptJob("c", "miniworld/smiley", config), path)
    # a manifest asking for another token rate is another run: trained, not skipped
    assert not engine.bundle_is_finished(ConceptJob("c", "miniworld/smiley", config.with_changes(lr_token=1e-3)), path)


def test_a_manifest_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows Notepad starts UTF-8 with a BOM, which TOML itself refuses: it is read as the text it marks."""
    path = _write_manifest(tmp_path / "fleet.toml", MINIWORLD_PAIR, [{"name": "a", "photos": "miniworld/smiley"}])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    (concept,) = load_manifest(path).concepts
    assert concept.name == "a" and concept.subject == "smiley" and concept.config.steps == STEPS


def test_misspelt_manifest_keys_name_the_key_they_may_mean(tmp_path):
    path = _write_manifest(tmp_path / "fleet.toml", MINIWORLD_PAIR,
                           [{"name": "a", "photos": "miniworld/smiley", "captons": ["x"], "config": {"stepz": 3}}],
                           shared={**SHARED, "presett": "paper"}, config={**CONFIG, "lr_studnet": 1e-4})
    message = _refused(path)
    for expected in ("unknown top-level key 'presett' (did you mean preset?)",
                     "[config]: unknown config key 'lr_studnet' (did you mean lr_student?)",
                     "concept 'a': unknown key 'captons' (did you mean captions?)",
                     "unknown config key 'stepz' (did you mean steps?)"):
        assert expected in message, message
    # a config field one level too high says where it goes
    path = _write_manifest(tmp_path / "fleet2.toml", MINIWORLD_PAIR,
                           [{"name": "a", "photos": "miniworld/smiley", "lr_token": 1e-3}],
                           shared={**SHARED, "lr_student": 1e-4}, config=CONFIG)
    message = _refused(path)
    assert "concept 'a': 'lr_token' is a config field: put it under [concept.config]" in message, message
    assert "'lr_student' is a config field: put it under [config]" in message, message


def test_fleet_run_check_reads_every_photo_as_a_worker_will(tiny_pair_folders, tmp_path, capsys):
    good, torn, small = _photos(tmp_path / "good", 40), _photos(tmp_path / "torn", 60), _photos(tmp_path / "small", 80)
    data = (torn / "1.png").read_bytes()
    (torn / "1.png").write_bytes(data[: len(data) // 2])  # a copy cut short: named by --check, not on a worker
    Image.new("RGB", (16, 16), (9, 9, 9)).save(small / "3.png")  # a thumbnail, under half the 64-px resolution
    path = _write_manifest(tmp_path / "fleet.toml", tiny_pair_folders, [
        {"name": "good", "photos": str(good), "class_word": "dog"},
        {"name": "torn", "photos": str(torn), "class_word": "dog"},
        {"name": "small", "photos": str(small), "class_word": "dog"}])
    assert main(["fleet", "run", str(path), "--out", str(tmp_path / "out"), "--check"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: 2 concept(s) whose photos cannot be trained on:"), error
    assert "concept 'torn':" in error and "1.png" in error and "concept 'small':" in error and "3.png" in error
    assert "below 32 px (0.5 of the 64-px training resolution" in error and "lower resolution" in error, error
    (tmp_path / "afile").write_text("not a folder")
    good_only = _write_manifest(tmp_path / "good.toml", tiny_pair_folders,
                                [{"name": "good", "photos": str(good), "class_word": "dog"}])
    assert main(["fleet", "run", str(good_only), "--out", str(tmp_path / "afile" / "out"), "--check"]) == 2
    assert "afile is a file, not a folder; choose another --out folder" in capsys.readouterr().err
    assert "concept 'good'" not in error and not (tmp_path / "out").exists()


def test_fleet_report_metrics_scores_a_mini_world_concept_as_its_table_row(tmp_path, capsys):
    """`fleet report --metrics` draws each subject's evaluation prompts four times with the student, as `bench
    quality` and the demo do: the shipped concept (the demo's checker_diamond, seed 0) scores its table row. What
    cannot be scored says why in its row, the rest is scored, and the driver's state file is left as it was."""
    import shutil

    from echodistill.fleet.state import FleetState
    from echodistill.miniworld.paths import SHIPPED_CONCEPT_DIR

    bundle = shutil.copy(SHIPPED_CONCEPT_DIR / "checker_diamond.safetensors", tmp_path / "checker_diamond.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    out = tmp_path / "fleet"
    done = {"status": "done", "subject": "checker_diamond", "bundle": str(bundle)}
    state_file = FleetState(out, {
        "diamond": done,
        "twin": dict(done),  # the same bundle file: scored once, the same numbers
        "queued": {"status": "queued", "subject": "window"},
        "unknown": {**done, "subject": "no_such_subject"},
        "gone": {**done, "bundle": str(tmp_path / "gone.safetensors")},
        "folder": {**done, "bundle": str(tmp_path / "folder.safetensors")},
        "number": {**done, "bundle": 5},
    }).save()
    written = state_file.read_bytes()
    assert main(["fleet", "report", "--out", str(out), "--metrics"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert state_file.read_bytes() == written
    rows = {row["concept"]: row for row in json.loads((out / "fleet-report.json").read_text())}
    # 0.352 / 0.979 when it drew one picture per prompt (12 pictures); the table's 0.420 / 0.974 at four (48)
    assert rows["diamond"]["subject_fidelity"] == pytest.approx(0.4202, abs=5e-4)
    assert rows["diamond"]["prompt_fidelity"] == pytest.approx(0.9740, abs=5e-4)
    assert rows["diamond"]["metrics_error"] is None
    assert (rows["twin"]["subject_fidelity"], rows["twin"]["prompt_fidelity"]) == (
        rows["diamond"]["subject_fidelity"], rows["diamond"]["prompt_fidelity"])
    assert rows["queued"]["subject_fidelity"] is None and rows["queued"]["metrics_error"] is None  # not finished
    assert "unknown subject 'no_such_subject'" in rows["unknown"]["metrics_error"]
    assert "concept bundle not found" in rows["gone"]["metrics_error"]
    assert "is a folder, not a concept bundle" in rows["folder"]["metrics_error"]
    assert "not a file path" in rows["number"]["metrics_error"]
    assert "| no_such_subject" not in (out / "fleet-report.md").read_text()  # the reason, in the markdown too
    assert "unknown subject 'no_such_subject'" in (out / "fleet-report.md").read_text()

    # a later plain report keeps the scores of the same bundle; one trained anew since shows none
    assert main(["fleet", "report", "--out", str(out)]) == 0
    assert json.loads((out / "fleet-report.json").read_text())[0]["subject_fidelity"] == pytest.approx(0.4202, abs=5e-4)
    metrics = json.loads((out / "fleet-metrics.json").read_text())
    metrics["twin"]["subject_fidelity"] = "abc"  # a file edited by hand: not shown as a score
    (out / "fleet-metrics.json").write_text(json.dumps(metrics))
    assert main(["fleet", "report", "--out", str(out)]) == 0
    rows = {row["concept"]: row for row in json.loads((out / "fleet-report.json").read_text())}
    assert rows["twin"]["subject_fidelity"] is None and rows["diamond"]["subject_fidelity"] is not None
    os.utime(bundle, ns=(1, 1))
    assert main(["fleet", "report", "--out", str(out)]) == 0
    assert json.loads((out / "fleet-report.json").read_text())[0]["subject_fidelity"] is None


def test_fleet_report_refuses_a_state_file_whose_records_are_not_records(tmp_path, capsys):
    out = tmp_path / "fleet"
    out.mkdir()
    for concepts in ('{"a": "done"}', "[1, 2]"):
        (out / "fleet-state.json").write_text(f'{{"manifest": "", "concepts": {concepts}}}')
        assert main(["fleet", "report", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert "is not a fleet state file (its concepts are not one record per concept)" in error, error
        assert "Traceback" not in error
