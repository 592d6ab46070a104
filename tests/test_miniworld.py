"""The shipped mini world: renderer, grammar, concepts, shipped models and oracles; the training script's pieces on toy sizes."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from echodistill.miniworld import architecture as arch
from echodistill.miniworld.concepts import CONCEPTS, TOKEN_PLACEHOLDER, evaluation_prompts, reference_images
from echodistill.miniworld.grammar import (
    ATTRIBUTES, POSITION_PHRASES, SHAPES, Scene, describe, sample_scene, training_caption,
)
from echodistill.miniworld.oracle import Oracle, OracleError
from echodistill.miniworld.render import render
from echodistill.models.diffusion import alphas_cumprod_for, encode_prompts, student_one_step
from echodistill.models.pair import load_model_pair
from echodistill.models.tokenizer import load_clip_tokenizer
from echodistill.sampling.samplers import decode_latents

SHIPPED_LIMIT = 40_000_000  # bytes of distinct file content: the shipped world fits in 40 MB


def _scenes(count: int, seed: int, subject: str | None = None) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, subject) for _ in range(count)]


def _renders(scenes: list[Scene], seed: int) -> np.ndarray:
    return np.stack([render(scene, np.random.default_rng([seed, i])) for i, scene in enumerate(scenes)])


# --- renderer and grammar -----------------------------------------------------------------------

def test_render_is_deterministic_and_seed_dependent():
    scene = Scene("star", "red", "large", "left", "blue", "striped")
    first = render(scene, np.random.default_rng(3))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render(scene, np.random.default_rng(3)))
    assert not np.array_equal(first, render(scene, np.random.default_rng(4)))  # jitter moves it
    assert _scenes(5, 1) == _scenes(5, 1)


def test_render_follows_the_attributes():
    image = render(Scene("square", "red", "large", "left", "blue", "plain"), np.random.default_rng(0)).astype(int)
    red, blue = np.array([219, 41, 41]), np.array([41, 79, 219])
    assert np.abs(image[32, 19] - red).max() <= 2  # the object's centre, on the left
    assert np.abs(image[32, 56] - blue).max() <= 2  # plain background on the right
    small = render(Scene("circle", "white", "small", "center", "black", "plain"), np.random.default_rng(0))
    large = render(Scene("circle", "white", "large", "center", "black", "plain"), np.random.default_rng(0))
    assert (small.mean(-1) > 128).sum() * 3 < (large.mean(-1) > 128).sum()


def test_captions_state_their_attributes():
    rng = np.random.default_rng(0)
    for scene in _scenes(200, 2):
        caption = describe(scene)
        assert dict(caption.stated) == scene.attributes()
        text = caption.text
        for word in (scene.size, scene.color, scene.subject, POSITION_PHRASES[scene.position], scene.bg_color):
            assert word in text
        assert scene.bg_pattern in text and text.endswith("background")
        assert scene.color != scene.bg_color  # an object never vanishes into its background
        drawn_scene, drawn = training_caption(scene, rng)
        assert drawn.stated.items() <= drawn_scene.attributes().items()
        assert drawn.stated["shape"] == scene.subject and scene.subject in drawn.text


def test_caption_example_and_partial_statement():
    scene = Scene("circle", "red", "large", "left", "blue", "striped")
    assert describe(scene).text == "a large red circle on the left, on a blue striped background"
    partial = describe(scene, frozenset({"color", "bg_color", "bg_pattern"}))
    assert partial.text == "a red circle on a blue striped background"
    assert set(partial.stated) == {"shape", "color", "bg_color", "bg_pattern"}


def test_scene_rejects_unknown_words():
    with pytest.raises(ValueError, match="Scene.bg_pattern='dotted'"):
        Scene("circle", "red", "large", "left", "blue", "dotted")
    with pytest.raises(ValueError, match="a grammar shape needs a colour"):
        Scene("circle", None, "large", "left", "blue", "plain")


def test_vocabulary_is_known_to_the_clip_tokenizer():
    tokenizer = load_clip_tokenizer("sd2")
    from echodistill.miniworld.training import TEXT_ATTRIBUTES
    from echodistill.miniworld.procedural import DECORATION_NOUNS

    words = {w for choices in ATTRIBUTES.values() for w in choices} | {"on", "the", "at", "in", "background", "with"}
    words |= {w for choices in TEXT_ATTRIBUTES.values() for phrase in choices for w in phrase.split()}
    words |= {noun.split()[-1] for noun in DECORATION_NOUNS.values()}  # "a cross" -> cross
    for word in sorted(words):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids and tokenizer.unk_token_id not in ids, word
        assert len(ids) <= 2, f"{word!r} splits into {len(ids)} pieces"


# --- concepts -----------------------------------------------------------------------------------

def test_concepts_have_references_and_prompts():
    assert len(CONCEPTS) >= 6
    for concept in CONCEPTS.values():
        assert concept.name not in SHAPES and concept.class_word in SHAPES
        refs = reference_images(concept)
        assert 4 <= len(refs) <= 6 and refs.shape[1:] == (64, 64, 3) and refs.dtype == np.uint8
        assert len({r.tobytes() for r in refs}) == len(refs)  # varied poses, no duplicates
        np.testing.assert_array_equal(refs, reference_images(concept))
        prompts = evaluation_prompts(concept)
        assert len(prompts) >= 10 and len({p.text for p in prompts}) == len(prompts)
        for prompt in prompts:
            assert f"{TOKEN_PLACEHOLDER} {concept.class_word}" in prompt.text
            assert "<v*>" in prompt.text.format(token="<v*>")
            assert prompt.stated == prompt.scene.attributes()
            assert prompt.scene.bg_color not in concept.clashes


# --- shipped models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped pair loads without a single warning
        return load_model_pair(arch.TEACHER_DIR, arch.STUDENT_DIR)


def test_a_units_pictures_are_drawn_a_batch_at_a_time_each_from_its_own_seed(pair):
    from echodistill.miniworld.scoring import SAMPLE_BATCH, UnitInputs

    unit = UnitInputs.build(CONCEPTS["window"], 3, images_per_prompt=5, captions=True)  # 60 pictures: two batches
    assert len(unit.texts) == 60 > SAMPLE_BATCH
    images = unit.sample(pair, part="student")
    assert images.shape == (60, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    last = UnitInputs.build(CONCEPTS["window"], 3, images_per_prompt=5, captions=True)
    last.texts, last.noise_seeds = unit.texts[-1:], unit.noise_seeds[-1:]  # the last picture, drawn alone
    assert unit.noise_seeds[-1] == 3 * 100_000 + 59
    torch.testing.assert_close(last.sample(pair, part="student")[0], images[-1], atol=1e-4, rtol=0)


def test_shipped_assets_fit_the_size_budget():
    # git stores identical files once (the text encoder and VAE both folders share): distinct content counts
    distinct = {hashlib.sha256(path.read_bytes()).hexdigest(): path.stat().st_size
                for path in arch.ASSET_ROOT.rglob("*") if path.is_file()}
    assert sum(distinct.values()) <= SHIPPED_LIMIT, f"{sum(distinct.values()) / 1e6:.1f} MB of distinct files shipped"
    for folder in (arch.TEACHER_DIR, arch.STUDENT_DIR):
        for weights in folder.rglob("*.safetensors"):
            header = json.loads(weights.read_bytes()[8 : 8 + int.from_bytes(weights.read_bytes()[:8], "little")])
            assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}, weights


def test_shipped_folders_share_encoder_and_vae_and_have_the_right_schedulers():
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (arch.TEACHER_DIR / part).read_bytes() == (arch.STUDENT_DIR / part).read_bytes(), part
    assert not (arch.TEACHER_DIR / "tokenizer").exists()  # the shipped CLIP vocabulary serves
    teacher = json.loads((arch.TEACHER_DIR / "scheduler" / "scheduler_config.json").read_text())
    student = json.loads((arch.STUDENT_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert teacher["_class_name"] == "DDIMScheduler" and teacher["prediction_type"] == "epsilon"
    assert student["_class_name"] == "EulerDiscreteScheduler" and student["timestep_spacing"] == "trailing"
    assert student["prediction_type"] == "epsilon"


def test_the_shipped_image_prompt_adapter_sits_beside_the_oracle_and_fits_the_shipped_student(pair):
    from echodistill.miniworld.image_prompt import ImagePromptAdapter, adapter_path

    path = adapter_path(arch.ORACLE_ROOT)  # where `bench quality --methods image_prompt` looks by default
    assert path == arch.ASSET_ROOT / "image_prompt" / "image_prompt_adapter.safetensors"
    adapter = ImagePromptAdapter.load(path)
    unet = pair.student.unet
    processors = dict(unet.attn_processors)
    with adapter.attached(unet):  # raises ImagePromptError for an adapter made for another UNet
        assert dict(unet.attn_processors) != processors
    assert dict(unet.attn_processors) == processors  # handed back as it was


def test_shipped_student_makes_finite_64px_images_in_one_step(pair):
    assert pair.text_encoder.config.vocab_size == 49408
    assert pair.teacher.prediction_type == pair.student.prediction_type == "epsilon"
    cond = encode_prompts(pair.tokenizer, pair.text_encoder, ["a large red circle on the left, on a blue striped background"] * 2)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = student_one_step(pair.student.unet, noise, cond, alphas_cumprod_for(pair.student.scheduler_config),
                                   pair.student.prediction_type)  # (2, 4, 16, 16)
    images = decode_latents(pair.vae, latents)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert images.std() > 0.05  # a picture, not a flat field


# --- oracles ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    return Oracle.load()


def test_prompt_fidelity_of_real_renders_is_near_one(oracle):
    scenes = _scenes(96, 5)
    images = _renders(scenes, 6)
    captions = [describe(scene) for scene in scenes]
    score = oracle.prompt_fidelity(images, [c.stated for c in captions])
    assert score.shape == (96,) and float(score.mean()) >= 0.9
    # The same pictures under shuffled prompts: clearly worse, so the score measures the prompt.
    shuffled = [captions[(i + 1) % len(captions)].stated for i in range(len(captions))]
    assert float(oracle.prompt_fidelity(images, shuffled).mean()) < 0.6
    # Floats in [0, 1] (what the samplers return) read like uint8 renders.
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(oracle.prompt_fidelity(as_float, [c.stated for c in captions]), score)


def test_prompt_fidelity_reads_concept_contexts(oracle):
    for concept in CONCEPTS.values():
        prompts = evaluation_prompts(concept)
        images = _renders([p.scene for p in prompts], 7)
        assert float(oracle.prompt_fidelity(images, [p.stated for p in prompts]).mean()) >= 0.9, concept.name


def test_subject_fidelity_separates_subjects(oracle):
    names = sorted(CONCEPTS)
    renders = {name: _renders([p.scene for p in evaluation_prompts(CONCEPTS[name])], 8) for name in names}
    same, other = [], []
    for name in names:
        references = reference_images(CONCEPTS[name])
        same.append(oracle.subject_fidelity(renders[name], references))
        other += [oracle.subject_fidelity(renders[o], references) for o in names if o != name]
    # measured: same subject 0.76-0.91, another concept at most 0.30
    assert min(same) >= 0.7 and max(other) <= min(same) - 0.3, (same, other)


def test_oracle_rejects_bad_input(oracle, tmp_path):
    with pytest.raises(OracleError, match="one per image"):
        oracle.prompt_fidelity(np.zeros((2, 64, 64, 3), np.uint8), [{"size": "small"}])
    with pytest.raises(OracleError, match="unknown attributes"):
        oracle.prompt_fidelity(np.zeros((1, 64, 64, 3), np.uint8), [{"mood": "happy"}])
    with pytest.raises(OracleError, match="run scripts/train_miniworld.py"):
        Oracle.load(tmp_path)
    (tmp_path / "attribute_reader.safetensors").write_bytes(b"\x10" + bytes(40))  # truncated, not safetensors
    with pytest.raises(OracleError, match=r"attribute_reader.safetensors is not a readable safetensors file \(its header is damaged; "
                       r"safetensors says: [^)]*\): rebuild it with scripts/train_miniworld.py"):
        Oracle.load(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "attribute_reader.safetensors",
              metadata={"class": "AttributeReader", "labels": json.dumps(ATTRIBUTES), "config": "{}"})
    with pytest.raises(OracleError, match="does not hold AttributeReader weights this version can read"):
        Oracle.load(tmp_path)


# --- training script pieces ---------------------------------------------------------------------

def test_teacher_training_cut_off_and_resumed_ends_as_an_uncut_run(tmp_path, cut_after_checkpoint):
    from echodistill.miniworld import training

    scheduler, latents, ids, empty = _teacher_inputs()
    settings = training.TeacherSettings(steps=4, batch=2, warmup=1, checkpoint_every=2)
    quiet = lambda message: None  # noqa: E731

    uncut, _ = training.train_teacher(latents, ids, empty, scheduler, settings, 0, quiet)

    state = tmp_path / "teacher_running.pt"
    with cut_after_checkpoint():  # the session ends right after the first checkpoint
        training.train_teacher(latents, ids, empty, scheduler, settings, 0, quiet, resume_path=state)
    assert torch.load(state, weights_only=True)["step"] == 2
    lines = []
    resumed, _ = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lines.append, resume_path=state)
    assert any("resumed" in line and "step 2/4" in line for line in lines), lines
    for (name, a), b in zip(uncut.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_student_stage_cut_off_and_resumed_ends_as_an_uncut_run(tmp_path, cut_after_checkpoint):
    """Both halves resume: the teacher's pairs batch by batch, the distillation from its loop checkpoint."""
    import dataclasses

    from echodistill.miniworld import training

    scheduler, _, _, _ = _teacher_inputs()
    torch.manual_seed(0)
    teacher = arch.build_unet().eval()
    cond = torch.randn((3, 77, arch.TEXT_WIDTH), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((3, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    settings = training.StudentSettings(pair_steps=2, pair_batch=1, steps=4, batch=2, warmup=1, checkpoint_every=2)
    quiet = lambda message: None  # noqa: E731

    uncut_pairs = training.teacher_pairs(teacher, cond, cond[:1], noise, scheduler, settings, quiet)
    pairs_file = tmp_path / "student_pairs.pt"
    with cut_after_checkpoint("student_pairs.pt"):
        training.teacher_pairs(teacher, cond, cond[:1], noise, scheduler, settings, quiet, resume_path=pairs_file)
    assert len(torch.load(pairs_file, weights_only=True)["targets"]) == 1
    lines = []
    pairs = training.teacher_pairs(teacher, cond, cond[:1], noise, scheduler, settings, lines.append,
                                   resume_path=pairs_file)
    assert any("pairs resumed" in line and "at 1/3" in line for line in lines), lines
    assert torch.equal(pairs, uncut_pairs)

    other = dataclasses.replace(settings, pair_guidance=2.0)  # the saved pairs are another guidance's
    lines.clear()
    redone = training.teacher_pairs(teacher, cond, cond[:1], noise, scheduler, other, lines.append,
                                    resume_path=pairs_file)
    assert any("starting over" in line for line in lines), lines
    assert torch.equal(redone, training.teacher_pairs(teacher, cond, cond[:1], noise, scheduler, other, quiet))

    uncut = training.distill_student(teacher, noise, cond, pairs, scheduler, settings, 0, quiet)
    state = tmp_path / "student_running.pt"
    with cut_after_checkpoint("student_running.pt"):
        training.distill_student(teacher, noise, cond, pairs, scheduler, settings, 0, quiet, resume_path=state)
    assert torch.load(state, weights_only=True)["step"] == 2
    lines.clear()
    resumed = training.distill_student(teacher, noise, cond, pairs, scheduler, settings, 0, lines.append,
                                       resume_path=state)
    assert any("student resumed" in line and "step 2/4" in line for line in lines), lines
    for (name, a), b in zip(uncut.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _teacher_inputs(count: int = 6):
    from echodistill.models.families import CONFIG_ROOT, family_config

    scheduler = family_config(CONFIG_ROOT / arch.FAMILY_OF_ROLE["teacher"]).scheduler
    latents = torch.randn((count, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    tokenizer = load_clip_tokenizer("sd2")
    ids = tokenizer(["a red circle"] * count, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    return scheduler, latents, ids, empty


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_trained_on_cuda_and_resumed_on_the_cpu_ends_near_a_cpu_run(tmp_path, cut_after_checkpoint):
    """The random draws stay on the CPU, so a GPU run follows the CPU run up to float rounding."""
    from echodistill.miniworld import training

    scheduler, latents, ids, empty = _teacher_inputs()
    settings = training.TeacherSettings(steps=4, batch=2, warmup=1, checkpoint_every=2)
    on_cpu, _ = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None)
    state = tmp_path / "teacher_running.pt"
    with cut_after_checkpoint():
        training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None, resume_path=state,
                               device="cuda")
    mixed, text_encoder = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None,
                                                 resume_path=state)
    assert mixed.device.type == "cpu" and text_encoder.device.type == "cpu"
    for (name, a), b in zip(on_cpu.state_dict().items(), mixed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_stages_take_a_device_and_return_cpu_models_without_touching_their_inputs():
    """The contract train_miniworld.py --device relies on, checked on the CPU: inputs are copied, not moved."""
    from echodistill.miniworld import training

    scheduler, latents, ids, empty = _teacher_inputs(4)
    vae = arch.build_vae()
    images = np.zeros((2, 64, 64, 3), np.uint8)
    encoded = training.encode_latents(vae, images, device="cpu")
    assert encoded.shape == (2, 4, 16, 16) and encoded.device.type == "cpu"
    settings = training.TeacherSettings(steps=1, batch=2, warmup=1)
    unet, text_encoder = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None,
                                                device="cpu")
    student_settings = training.StudentSettings(pair_steps=2, pair_batch=2, steps=1, batch=2, warmup=1)
    cond = torch.randn((2, 77, arch.TEXT_WIDTH))
    noise = torch.randn((2, 4, 16, 16))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    targets = training.teacher_pairs(unet, cond, cond[:1], noise, scheduler, student_settings, lambda m: None,
                                     device="cpu")
    student = training.distill_student(unet, noise, cond, targets, scheduler, student_settings, 0, lambda m: None,
                                       device="cpu")
    assert targets.shape == noise.shape and student.device.type == "cpu" and student is not unet
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # the teacher stayed as it was


def test_a_snapshot_carries_a_cut_teacher_run_to_an_empty_checkpoint_folder(tmp_path, cut_after_checkpoint):
    """Saved: float16 weights, the step, the generator, the seed; restored: a loop state the teacher goes on from,
    at the same schedule position and random draws, with fresh AdamW moments."""
    from safetensors.torch import load_file, save_file

    from echodistill.miniworld import snapshot, training

    scheduler, latents, ids, empty = _teacher_inputs()
    settings = training.TeacherSettings(steps=4, batch=2, warmup=1, checkpoint_every=2)
    ckpt, folder, elsewhere = tmp_path / "ckpt", tmp_path / "snapshot", tmp_path / "elsewhere" / "ckpt"
    with pytest.raises(snapshot.SnapshotError, match="no vae.pt to save"):
        snapshot.save_snapshot(ckpt, folder, settings, seed=0)
    assert not folder.exists()  # refused before the folder is made
    with cut_after_checkpoint():
        training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None,
                               resume_path=ckpt / "teacher_running.pt")
    vae = training.build_vae()
    training.save_atomically(ckpt / "vae.pt", {"state": vae.state_dict(), "scaling_factor": 0.25})
    folder.mkdir()
    (folder / "student.safetensors").write_bytes(b"an older snapshot's student, of another teacher")
    assert snapshot.save_snapshot(ckpt, folder, settings, seed=0) == {"vae": "finished", "teacher": "step 2 of 4"}
    assert sorted(p.name for p in folder.iterdir()) == ["teacher.safetensors", "text_encoder.safetensors",
                                                        "vae.safetensors"]  # the stale student is gone

    with pytest.raises(snapshot.SnapshotError, match="saved from a run with --seed 0; this run's is 5"):
        snapshot.restore_snapshot(folder, elsewhere, settings, seed=5)
    assert snapshot.restore_snapshot(folder, elsewhere, settings, seed=0) == {
        "vae": "finished", "teacher": "step 2 of 4 (AdamW moments restart)"}
    cut = torch.load(ckpt / "teacher_running.pt", weights_only=True)
    carried = torch.load(elsewhere / "teacher_running.pt", weights_only=True)
    assert carried["step"] == 2 and torch.equal(carried["generator"], cut["generator"])
    assert carried["scheduler"]["last_epoch"] == cut["scheduler"]["last_epoch"] == 2
    assert carried["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cut["optimizer"]["param_groups"][0]["lr"])
    assert carried["optimizer"]["state"] == {} and cut["optimizer"]["state"]  # the moments start afresh
    for name, weight in cut["unet"].items():  # rounded to float16 once, float32 again
        assert carried["unet"][name].dtype == weight.dtype
        assert torch.equal(carried["unet"][name], weight.half().float()), name
    vae_back = torch.load(elsewhere / "vae.pt", weights_only=True)
    assert vae_back["scaling_factor"] == 0.25
    assert all(torch.equal(vae_back["state"][k], v) for k, v in vae.state_dict().items())  # float32 kept

    lines = []  # the teacher goes on from the restored state to the end
    unet, _ = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lines.append,
                                     resume_path=elsewhere / "teacher_running.pt")
    assert any("resumed" in line and "step 2/4" in line for line in lines), lines
    assert all(torch.isfinite(w).all() for w in unet.state_dict().values())

    with pytest.raises(snapshot.SnapshotError, match="already holds vae.pt, teacher_running.pt"):
        snapshot.restore_snapshot(folder, elsewhere, settings, seed=0)  # this machine's own checkpoints win
    progress = tmp_path / "progress" / "ckpt"
    progress.mkdir(parents=True)
    (progress / "student_pairs.pt").write_bytes(b"another run's student progress")
    with pytest.raises(snapshot.SnapshotError, match="already holds student_pairs.pt"):
        snapshot.restore_snapshot(folder, progress, settings, seed=0)
    with pytest.raises(snapshot.SnapshotError, match="saved from a 4-step teacher run; this run trains 8 steps"):
        snapshot.restore_snapshot(folder, tmp_path / "third", training.TeacherSettings(steps=8), seed=0)
    from echodistill.models.tensor_files import atomic_save_safetensors

    teacher_tensors, teacher_metadata = snapshot._read(folder / "teacher.safetensors")
    for step in ("0", "4", "1000000000000"):  # only 1 .. steps - 1 is a running teacher (a huge one would hang)
        atomic_save_safetensors(teacher_tensors, folder / "teacher.safetensors", {**teacher_metadata, "step": step})
        with pytest.raises(snapshot.SnapshotError, match=f"a running teacher at step {step} of 4"):
            snapshot.restore_snapshot(folder, tmp_path / "seventh", settings, seed=0)
    for changed, message in ((("finished", "1"), "no readable 'finished'"), (("seed", "5"), "--seed 5; this run's is 0")):
        atomic_save_safetensors(teacher_tensors, folder / "teacher.safetensors", {**teacher_metadata, changed[0]: changed[1]})
        with pytest.raises(snapshot.SnapshotError, match=message):
            snapshot.restore_snapshot(folder, tmp_path / "seventh", settings, seed=0)
    atomic_save_safetensors(teacher_tensors, folder / "teacher.safetensors", teacher_metadata)
    with pytest.raises(snapshot.SnapshotError, match="no such folder"):
        snapshot.restore_snapshot(tmp_path / "nowhere", tmp_path / "fifth", settings, seed=0)
    teacher_file = folder / "teacher.safetensors"
    tensors, metadata = load_file(teacher_file), snapshot._read(teacher_file)[1]
    del tensors["conv_in.bias"]
    save_file(tensors, teacher_file, metadata=metadata)
    with pytest.raises(snapshot.SnapshotError, match="tensors do not fit the model this recipe builds.*conv_in.bias"):
        snapshot.restore_snapshot(folder, tmp_path / "sixth", settings, seed=0)
    (folder / "text_encoder.safetensors").write_bytes(b"cut")
    snapshot.save_snapshot(ckpt, folder, settings, seed=0)  # saved again: whole
    (folder / "text_encoder.safetensors").write_bytes(b"cut")
    with pytest.raises(snapshot.SnapshotError, match="text_encoder.safetensors is not a readable safetensors file"):
        snapshot.restore_snapshot(folder, tmp_path / "fourth", settings, seed=0)
    for refused in ("third", "fourth", "fifth", "sixth", "seventh"):  # nothing half restored
        assert not (tmp_path / refused).exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(snapshot.SnapshotError, match="a_file is a file, not a folder"):
        snapshot.save_snapshot(ckpt, tmp_path / "a_file", settings, seed=0)


def test_train_script_stops_after_the_stage_asked_and_refuses_what_it_cannot_do(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "train_miniworld.py"
    run = lambda *flags: subprocess.run([sys.executable, str(script), "--quick", "--log-dir", str(tmp_path), *flags],  # noqa: E731
                                        capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                                         "OMP_NUM_THREADS": "1"})
    refused = run("--from-stage", "student", "--to-stage", "vae")
    assert refused.returncode == 2 and "--to-stage vae comes before --from-stage student" in refused.stderr
    for flags, message in ((("--from-stage", "write"), "--from-stage write reads"),
                           (("--threads", "0"), "--threads 0: give 1 or more"),
                           (("--seed", "-1"), "--seed -1: give a non-negative integer"),
                           (("--oracle-only", "--to-stage", "vae"), "--oracle-only runs on its own"),
                           (("--save-snapshot", "x", "--from-stage", "vae"), "--save-snapshot runs on its own"),
                           (("--save-snapshot", ""), "give a folder name (an empty one would mean the current"),
                           (("--from-stage", "eval", "--keep-oracle"), "the eval stage needs the oracle"),
                           (("--from-stage", "image_prompt", "--to-stage", "image_prompt"), "reads the written models"),
                           (("--image-prompt-only",), "--image-prompt-only reads the written models in")):
        refused = run(*flags)  # refused before anything renders or writes
        assert refused.returncode == 2 and message in refused.stderr, (flags, refused.stderr)
    if not torch.cuda.is_available():
        refused = run("--device", "cuda")
        assert refused.returncode == 2 and "--device cuda: torch sees no CUDA GPU" in refused.stderr
    assert not (tmp_path / "quick").exists()
    done = run("--to-stage", "vae")
    assert done.returncode == 0, done.stderr
    ckpt = tmp_path / "quick" / "ckpt"
    assert (ckpt / "vae.pt").is_file() and not (ckpt / "teacher.pt").exists()
    assert "stopped after the vae stage" in done.stdout
    saved = run("--save-snapshot", str(tmp_path / "snapshot"))  # carried to another machine: the VAE alone so far
    assert saved.returncode == 0 and '"vae": "finished"' in saved.stdout, saved.stderr
    assert sorted(p.name for p in (tmp_path / "snapshot").iterdir()) == ["vae.safetensors"]
    typo = run("--save-snapshot", str(tmp_path / "other"), "--seed", "5")  # the run trained with seed 0
    assert typo.returncode == 2 and "the run in" in typo.stderr and "trained with --seed 0" in typo.stderr
    kept = run("--restore-snapshot", str(tmp_path / "snapshot"))
    assert kept.returncode == 2 and "already holds vae.pt" in kept.stderr  # this machine's own checkpoint wins
    missing = run("--from-stage", "student")  # the VAE is there, the teacher is not
    assert missing.returncode == 2 and f"reads {ckpt / 'teacher.pt'}, which does not exist" in missing.stderr
    # a finished stage is never trained again from scratch by accident: it would replace hours of training
    vae_bytes = (ckpt / "vae.pt").read_bytes()
    for start in ("vae", "render"):
        again = run("--from-stage", start)
        assert again.returncode == 2 and f"the vae stage has finished ({ckpt / 'vae.pt'})" in again.stderr
        assert "leave out --from-stage (this run would go on from the teacher stage)" in again.stderr
        assert f"remove {ckpt / 'vae.pt'} first" in again.stderr
    other_seed = run("--seed", "3")  # would go on from a VAE another seed trained
    assert other_seed.returncode == 2 and "trained with --seed 0 (its train.log)" in other_seed.stderr
    nothing_left = run("--to-stage", "vae")  # the same command again: the VAE is done, nothing to do, no error
    assert nothing_left.returncode == 0 and "nothing to do" in nothing_left.stdout, nothing_left.stderr
    assert (ckpt / "vae.pt").read_bytes() == vae_bytes
    with open(tmp_path / "quick" / "train.log", "a") as log:  # a run on its own with another seed trains no ckpt/
        log.write("[00:00:00 +      0s] start: scripts/train_miniworld.py --oracle-only --seed 5; seed 5; {}\n")
    assert "the vae stage has finished" in run("--from-stage", "vae").stderr  # not a seed refusal
    (ckpt / "teacher.pt").write_bytes(b"old")  # a finished teacher's file, damaged: refused before the render
    damaged = run("--to-stage", "write")
    assert damaged.returncode == 2 and f"{ckpt / 'teacher.pt'}: not a readable checkpoint" in damaged.stderr
    assert f"remove {ckpt / 'teacher.pt'} to train the teacher stage again" in damaged.stderr
    assert "Traceback" not in damaged.stderr
    (ckpt / "teacher.pt").write_bytes((ckpt / "vae.pt").read_bytes())  # readable, but another stage's
    wrong = run("--to-stage", "write")
    assert wrong.returncode == 2 and "teacher.pt is not a teacher checkpoint (it lacks text_encoder, unet)" in wrong.stderr
    (ckpt / "vae.pt").rename(ckpt / "vae.kept")  # a gap: the teacher was made from the VAE that is gone
    gap = run("--to-stage", "vae")
    assert gap.returncode == 2 and "holds teacher.pt but not vae.pt, which they were made from" in gap.stderr
    (ckpt / "vae.kept").rename(ckpt / "vae.pt")
    (ckpt / "teacher.pt").unlink()
    (ckpt / "teacher_running.pt").write_bytes(b"old")  # a cut teacher, on the latents of a VAE about to be replaced
    (ckpt / "vae.pt").unlink()  # to train a finished stage again, its checkpoint goes first
    redone = run("--to-stage", "vae")
    assert redone.returncode == 0 and (ckpt / "vae.pt").is_file() and not (ckpt / "teacher_running.pt").exists()
    assert "removed teacher_running.pt: it was trained on another VAE's latents" in redone.stdout
    rest = run("--to-stage", "image_prompt", "--keep-oracle")  # goes on from the teacher, on the VAE just made
    assert rest.returncode == 0, rest.stderr
    assert "from the teacher stage, on the finished stages kept in" in rest.stdout
    assert "stopped after the image_prompt stage" in rest.stdout
    assert (tmp_path / "quick" / "image_prompt" / "image_prompt_adapter.safetensors").is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == ["student.pt", "teacher.pt", "vae.pt"]  # no progress files left
    kept = {name: (ckpt / name).read_bytes() for name in ("vae.pt", "teacher.pt", "student.pt")}
    rewritten = run("--to-stage", "write")  # started again when all is trained: writes the folders again
    assert rewritten.returncode == 0 and "from the write stage" in rewritten.stdout, rewritten.stderr
    assert {name: (ckpt / name).read_bytes() for name in kept} == kept


# --- the main job -------------------------------------------------------------------------------

def test_demo_trains_a_fresh_procedural_subject_by_seed(tmp_path):
    from echodistill.cli import main
    from echodistill.miniworld.procedural import VALIDATION_SEEDS

    name = f"procedural_{VALIDATION_SEEDS.start}"  # given as its bare seed
    assert main(["demo", "--steps", "1", "--concept", str(VALIDATION_SEEDS.start), "--out", str(tmp_path),
                 "--threads", "1"]) == 0
    assert json.loads((tmp_path / f"{name}_metrics.json").read_text())["concept"] == name
    assert (tmp_path / f"{name}_contact_sheet.png").is_file()


def test_demo_trains_a_held_out_concept_and_writes_sheet_and_metrics(tmp_path, capsys):
    from echodistill.cli import main

    assert main(["demo", "--steps", "2", "--concept", "window", "--out", str(tmp_path), "--threads", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]  # names every file it wrote
    for name in ("window_contact_sheet.png", "window.safetensors", "window_metrics.json"):
        assert f" {tmp_path / name}" in last and (tmp_path / name).is_file(), (name, last)
    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert main(["demo", "--steps", "2", "--concept", "window", "--out", str(tmp_path), "--threads", "1"]) == 2
    assert "pass --overwrite to run the demo anew" in capsys.readouterr().err  # a second run replaces nothing
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == written
    metrics = json.loads((tmp_path / "window_metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["concept"] == "window" and metrics["images_per_prompt"] == 4
    assert metrics["seed"] == 0
    for key in ("student_subject_fidelity", "teacher_subject_fidelity", "student_prompt_fidelity",
                "teacher_prompt_fidelity", "base_student_subject_fidelity"):
        assert -1.0 <= metrics[key] <= 1.0, key
    from PIL import Image

    sheet = Image.open(tmp_path / "window_contact_sheet.png")
    prompts = len(evaluation_prompts(CONCEPTS["window"]))
    assert sheet.width >= 64 * min(prompts, 8) and sheet.height >= 3 * 64  # three rows of pictures
    shown = json.loads(sheet.info["echodistill"])
    assert shown["concept"] == "window" and len(shown["prompts"]) == prompts
    assert shown["seeds"] == [4 * i for i in range(prompts)]  # each prompt's first of the four pictures scored
    from echodistill.concepts.bundle import ConceptBundle

    bundle = ConceptBundle.load(tmp_path / "window.safetensors")
    assert bundle.step == 2
    # trained as bench quality trains EchoDistill: tuned rates (x10 the paper's, the token row at 1e-3) on
    # grammar-captioned references
    assert bundle.config["lr_teacher"] == pytest.approx(1e-4) and bundle.config["lr_student"] == pytest.approx(2e-4)
    assert bundle.config["lr_token"] == 1e-3


def test_teacher_stage_with_text_lr_zero_leaves_the_pretrained_encoder_untouched():
    from echodistill.miniworld import training
    from echodistill.models.families import CONFIG_ROOT, family_config

    scheduler = family_config(CONFIG_ROOT / arch.FAMILY_OF_ROLE["teacher"]).scheduler
    latents = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    tokenizer = load_clip_tokenizer("sd2")
    ids = tokenizer(["a small red ring on the left"] * 4, padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    encoder = arch.build_text_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    settings = training.TeacherSettings(steps=2, batch=2, warmup=1, text_lr=0.0)
    unet, returned = training.train_teacher(latents, ids, empty, scheduler, settings, 0, lambda m: None, encoder)
    assert returned is encoder and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    torch.manual_seed(0)  # train_teacher's own seeding: this is the UNet it started from
    start = arch.build_unet()
    assert not torch.equal(unet.conv_in.weight, start.conv_in.weight)  # the UNet did train


def test_a_demo_that_fails_to_finish_leaves_the_earlier_results_whole(tmp_path, capsys, monkeypatch):
    """--overwrite replaces the bundle, sheet and metrics together at the end: a demo failing on the way (here: its
    metrics cannot be written) leaves the earlier three as they were. A folder where a file goes is refused first."""
    from echodistill.cli import main
    from echodistill.errors import OutputWriteError
    from echodistill.jobs import demo as demo_job

    earlier = {tmp_path / name: name.encode() for name in
               ("window.safetensors", "window_contact_sheet.png", "window_metrics.json")}
    for path, content in earlier.items():
        path.write_bytes(content)

    def failing(path, text):
        raise OutputWriteError(f"cannot write {path}: no space left on device")

    monkeypatch.setattr(demo_job, "atomic_write_text", failing)
    assert main(["demo", "--steps", "1", "--concept", "window", "--out", str(tmp_path), "--threads", "1",
                 "--overwrite"]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in earlier} == earlier

    (tmp_path / "window_metrics.json").unlink()
    (tmp_path / "window_metrics.json").mkdir()
    assert main(["demo", "--concept", "window", "--out", str(tmp_path), "--overwrite"]) == 2
    captured = capsys.readouterr()
    assert "window_metrics.json is a folder where the demo writes a file" in captured.err and captured.out == ""
    (tmp_path / "window_metrics.json").rmdir()
    staged = tmp_path / "run" / "window_contact_sheet.png"  # where it is written first (left by the failed run)
    staged.unlink()
    staged.mkdir()
    assert main(["demo", "--concept", "window", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "run/window_contact_sheet.png is a folder where the demo writes a file" in capsys.readouterr().err
