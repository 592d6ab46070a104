"""The EchoDistill trainer on a tiny pair: routing, frozen weights, resume, cancel, NaN guard, bundle."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from echodistill.concepts.bundle import BundleMismatchError, ConceptBundle
from echodistill.errors import ConfigError, EchoDistillError
from echodistill.models.adapters import WeightDelta, adapter_state_dict
from echodistill.models.concept import concept_embedding
from echodistill.models.pair import load_model_pair
from echodistill.training import previews
from echodistill.training import trainer as trainer_module
from echodistill.training.callbacks import Callbacks, TrainingCancelled, TrainingDiverged
from echodistill.training.config import PRESETS, TrainConfig, preset
from echodistill.training.data import load_concept_images
from echodistill.training.trainer import Trainer


def _images():
    pictures = []
    for i in range(3):
        picture = Image.new("RGB", (64, 64), (200, 40 * i, 60))
        picture.paste((20, 20, 220), (16 + 4 * i, 16, 40 + 4 * i, 48))
        pictures.append(picture)
    return load_concept_images(pictures, resolution=64)


def _config(**changes) -> TrainConfig:
    base = dict(
        steps=4,
        batch_size=2,
        resolution=64,
        class_word="dog",
        echo_start=2,
        echo_every=2,
        echo_samples=4,
        echo_keep_ratio=0.5,
        sample_every=0,
        save_every=0,
        ms_swd_projections=8,
        ms_swd_scales=2,
    )
    return TrainConfig(**{**base, **changes})


@pytest.fixture
def make_trainer(tiny_pair_folders, tmp_path):
    def make(config: TrainConfig | None = None, **kwargs) -> Trainer:
        pair = load_model_pair(*tiny_pair_folders)
        return Trainer(pair, _images(), config or _config(), run_dir=tmp_path / "run", **kwargs)

    return make


def _trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"teacher.{k}": v for k, v in adapter_state_dict(trainer.pair.teacher.unet).items()}
    state.update({f"student.{k}": v for k, v in adapter_state_dict(trainer.pair.student.unet).items()})
    state.update({f"heads.{k}": v for k, v in trainer.ensemble.heads_state_dict().items()})
    state["row"] = concept_embedding(trainer.pair.text_encoder).concept_row.detach().clone()
    return state


# --- config -------------------------------------------------------------------------------------


def test_paper_preset_holds_every_default_of_the_paper():
    config = preset("paper")
    assert (config.steps, config.batch_size, config.seed) == (1000, 2, 42)
    assert (config.adam_beta1, config.adam_beta2, config.weight_decay, config.adam_epsilon) == (0.9, 0.999, 1e-2, 1e-8)
    assert (config.lr_student, config.lr_teacher, config.lr_heads, config.grad_clip) == (2e-5, 1e-5, 1e-4, 1.0)
    assert (config.weight_adversarial, config.weight_latent_mse, config.weight_semantic, config.weight_ms_swd) == (
        1.0,
        1.0,
        1.0,
        0.1,
    )
    assert config.alpha_bar_weighting and config.teacher_cfg == 7.5
    assert config.adapter == "custom_diffusion" and config.mixed_precision == "no"
    assert set(PRESETS) == {"paper", "balanced", "lite"}
    assert preset("lite").batch_size == 1


def test_config_json_round_trip_and_errors_name_the_key():
    config = _config(discriminators=("teacher_features", "clip_vit_h14"), adapter="lora")
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match=r"^unknown config key\(s\) learning_rate; valid keys: steps, batch_size, "):
        TrainConfig.from_dict({"learning_rate": 1.0})  # no field is close: all of them, to choose from
    with pytest.raises(ConfigError) as info:  # unknown keys and the known fields' problems, all at once
        TrainConfig.from_dict({"stepz": 3, "steps": 0, "lr_studnet": 1.0})
    assert str(info.value).startswith("2 config problems:\n  - unknown config key(s) lr_studnet (did you mean "
                                      "lr_student?), stepz (did you mean steps?); valid keys: see the options table "
                                      'in README.md ("Training a concept")\n')
    assert str(info.value).endswith("\n  - steps=0 must be at least 1")
    assert set(info.value.parameters) == {"lr_studnet", "stepz", "steps"}
    with pytest.raises(ConfigError, match=r"^2 config problems:\n  - unknown config key\(s\) batchsize \(did you "
                                          r"mean batch_size\?\).*\n  - resolution=0 must be at least 1$"):
        TrainConfig().with_changes(batchsize=2, resolution=0)
    with pytest.raises(ConfigError, match="lr_student=-1.0 must be positive"):
        TrainConfig(lr_student=-1.0)
    with pytest.raises(ConfigError, match="adapter='dora' is not one of 'custom_diffusion', 'lora'"):
        TrainConfig(adapter="dora")
    with pytest.raises(ConfigError, match="discriminators=\\['dino'\\]: valid names are teacher_features"):
        TrainConfig(discriminators=("dino",))
    with pytest.raises(ConfigError, match="echo_keep_ratio=1.5 must be in \\(0, 1\\]"):
        TrainConfig(echo_keep_ratio=1.5)
    # what would train to NaN, never stop, or overflow the generator's seed: refused before anything loads
    with pytest.raises(ConfigError, match="lr_student=inf must be a finite number"):
        TrainConfig(lr_student=float("inf"))
    with pytest.raises(ConfigError, match="weight_semantic=nan must be a finite number"):
        TrainConfig(weight_semantic=float("nan"))
    with pytest.raises(ConfigError, match="lr_teacher=1e\\+308 must be at most 1"):
        TrainConfig(lr_teacher=1e308)
    with pytest.raises(ConfigError, match=f"seed={2**63} must be at most {2**63 - 1}"):
        TrainConfig(seed=2**63)
    assert TrainConfig(seed=2**63 - 1, lr_student=1.0).seed == 2**63 - 1
    with pytest.raises(ConfigError, match="steps=1000001 must be at most 1,000,000"):
        TrainConfig(steps=1_000_001)
    for steps in ("abc", float("nan"), [1], True):  # the preset scales echo rounds from steps: no crash first
        with pytest.raises(ConfigError, match="steps="):
            preset("paper", steps=steps)
    with pytest.raises(ConfigError, match="unknown preset 'fast'; valid presets: paper, balanced, lite"):
        preset("fast")
    assert set(TrainConfig.help()) == set(config.to_dict())


def test_lora_targets_with_the_custom_diffusion_adapter_is_refused_not_ignored(tmp_path, capsys):
    told = ("lora_targets=['to_q', 'to_v'] is read by the LoRA adapter only: custom_diffusion always trains every "
            "cross-attention K/V (attn2.to_k, attn2.to_v); use adapter='lora' with it, or leave lora_targets out")
    with pytest.raises(ConfigError) as info:
        TrainConfig(lora_targets=("to_q", "to_v"))  # the default adapter is custom_diffusion
    assert str(info.value) == told and info.value.parameters == ("lora_targets", "adapter")
    with pytest.raises(ConfigError, match=re.escape(told)):  # switching a LoRA config over keeps no stale targets
        TrainConfig(adapter="lora", lora_targets=("to_q", "to_v")).with_changes(adapter="custom_diffusion")
    assert TrainConfig(adapter="lora", lora_targets=("to_q", "to_v")).lora_targets == ("to_q", "to_v")
    assert TrainConfig().with_changes(adapter="lora").adapter == "lora"  # the default targets go with either
    reordered = tuple(reversed(TrainConfig().lora_targets))
    assert TrainConfig(lora_targets=reordered).adapter == "custom_diffusion"  # the same targets, another order
    from echodistill.cli import main

    assert main(["train", "--teacher", "miniworld/teacher", "--student", "miniworld/student", "--images",
                 "miniworld/window", "--class-word", "square", "--steps", "2", "--set", 'lora_targets=["to_q", "to_v"]',
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: --set {told}\n"  # in flag terms, before anything loads
    assert not list(tmp_path.iterdir())


def test_every_config_problem_is_reported_at_once_with_its_parameters():
    with pytest.raises(ConfigError) as info:
        TrainConfig(steps=0, lr_student=2.0, resolution=100)
    message = str(info.value)
    assert message.startswith("3 config problems:\n"), message
    for part in ("steps=0 must be at least 1", "lr_student=2.0 must be at most 1", "resolution=100 must be a multiple"):
        assert part in message, message
    assert info.value.parameters == ("steps", "lr_student", "resolution")
    assert "--steps 0" in info.value.in_terms_of({"steps": "--steps"})
    with pytest.raises(ConfigError) as info:  # a bad type hides no range problem of another field
        TrainConfig(steps="10", batch_size=None, lr_student=-1.0)
    message = str(info.value)
    assert message.startswith("3 config problems:"), message
    assert "lr_student=-1.0 must be positive" in message, message
    assert info.value.parameters == ("steps", "batch_size", "lr_student")
    with pytest.raises(ConfigError) as info:  # a field of the wrong type is compared with nothing: named once
        TrainConfig(steps=0.5, lr_teacher=float("nan"), echo_start=-3)
    message = str(info.value)
    assert message.startswith("3 config problems:"), message
    assert "steps=0.5 must be a whole number, at least 1, e.g. steps=1000" in message, message
    assert "lr_teacher=nan must be a finite number" in message and "lr_teacher=nan must be positive" not in message
    assert "echo_start=-3 must not be negative" in message and "steps=0.5 must be at least 1" not in message
    from echodistill.miniworld.recipe import preset_config

    with pytest.raises(ConfigError) as info:  # the mini world's recipe lists them all too
        preset_config({"class_word": "circle", "steps": 0, "batch_size": 0, "resolution": 65})
    assert str(info.value).startswith("3 config problems:"), str(info.value)


# --- routing and frozen weights -----------------------------------------------------------------


def _names_with_grad(trainer: Trainer) -> set[str]:
    modules = {
        "teacher": trainer.pair.teacher.unet,
        "student": trainer.pair.student.unet,
        "text": trainer.pair.text_encoder,
        "vae": trainer.pair.vae,
        "heads": trainer.ensemble,
    }
    return {
        f"{owner}.{name}"
        for owner, module in modules.items()
        for name, p in module.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }


def test_each_loss_reaches_only_its_own_parameters(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=1, echo=False))
    seen = []
    original = Trainer._apply

    def spy(self, optimizer):
        seen.append(_names_with_grad(self))
        original(self, optimizer)

    monkeypatch.setattr(Trainer, "_apply", spy)
    trainer.train_step()
    teacher_step, student_step, heads_step = seen
    assert any(n.startswith("teacher.") and n.endswith(".delta") for n in teacher_step)
    # transformers 4.x names it text.text_model.embeddings...; 5.x text.embeddings...
    assert any(n.startswith("text.") and n.endswith("embeddings.token_embedding.concept_row") for n in teacher_step)
    assert all(n.startswith("teacher.") and n.endswith(".delta") or n.endswith("concept_row") for n in teacher_step)
    # Student losses: student K/V deltas (and the heads they pass through), never teacher or text encoder.
    assert any(n.startswith("student.") for n in student_step)
    assert all(n.startswith("student.") and n.endswith(".delta") or n.startswith("heads.") for n in student_step)
    assert heads_step and all(n.startswith("heads.") for n in heads_step)


@pytest.mark.parametrize("adapter", ["custom_diffusion", "lora"])
def test_frozen_weights_stay_bit_for_bit(adapter, make_trainer):
    trainer = make_trainer(_config(steps=2, adapter=adapter, echo_start=1, echo_every=1))
    pair = trainer.pair

    def frozen(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}

    before = {
        name: frozen(m)
        for name, m in [
            ("teacher", pair.teacher.unet),
            ("student", pair.student.unet),
            ("vae", pair.vae),
            ("text", pair.text_encoder),
        ]
    }
    assert sum(len(v) for v in before.values()) > 100
    trained_before = _trained_state(trainer)
    trainer.train()
    for name, module in [
        ("teacher", pair.teacher.unet),
        ("student", pair.student.unet),
        ("vae", pair.vae),
        ("text", pair.text_encoder),
    ]:
        after = frozen(module)
        assert after.keys() == before[name].keys()
        for key, tensor in before[name].items():
            assert torch.equal(after[key], tensor), f"{name}.{key} changed"
    trained_after = _trained_state(trainer)
    changed = [k for k in trained_before if not torch.equal(trained_before[k], trained_after[k])]
    assert any(k.startswith("student.") for k in changed) and any(k.startswith("teacher.") for k in changed)
    assert "row" in changed


def test_custom_diffusion_wraps_exactly_the_cross_attention_kv(make_trainer):
    trainer = make_trainer()
    wrapped = [n for n, m in trainer.pair.student.unet.named_modules() if isinstance(m, WeightDelta)]
    assert wrapped and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in wrapped)
    assert len(wrapped) == 2 * sum(1 for n, _ in trainer.pair.student.unet.named_modules() if n.endswith("attn2"))


# --- resume, cancel, NaN --------------------------------------------------------------------------


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(make_trainer, tmp_path):
    full = make_trainer(_config(steps=4))
    full.train()
    expected = _trained_state(full)

    first = make_trainer(_config(steps=2))
    first.train()
    checkpoint = first.save_checkpoint(tmp_path / "half.pt")
    second = make_trainer(_config(steps=4))
    second.resume(checkpoint)
    assert second.step == 2 and len(second.echo) == len(first.echo) > 0
    second.train()
    got = _trained_state(second)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_cancel_saves_a_checkpoint_that_resumes(make_trainer):
    class StopAfterTwo(Callbacks):
        def __init__(self):
            self.progress = []

        def on_progress(self, step, total, logs):
            self.progress.append((step, total, logs["loss/student"]))

        def should_stop(self):
            return len(self.progress) >= 2

    callbacks = StopAfterTwo()
    trainer = make_trainer(_config(steps=4), callbacks=callbacks)
    with pytest.raises(TrainingCancelled, match="cancelled at step 2") as info:
        trainer.train()
    assert info.value.checkpoint.is_file()
    assert [p[:2] for p in callbacks.progress] == [(1, 4), (2, 4)]

    class Ends(Callbacks):
        def __init__(self):
            self.ended = []

        def on_train_end(self, step):
            self.ended.append(step)

    ends = Ends()
    resumed = make_trainer(_config(steps=4), callbacks=ends)
    resumed.resume(info.value.checkpoint)
    bundle = resumed.train()
    assert bundle.step == 4 and ends.ended == [4]  # once, at the end (not at the cancelled run's stop)


def test_resume_refuses_a_changed_config(make_trainer, tmp_path):
    trainer = make_trainer(_config(steps=1))
    trainer.train()
    checkpoint = trainer.save_checkpoint(tmp_path / "c.pt")
    other = make_trainer(_config(steps=3, lr_student=1e-3))
    with pytest.raises(EchoDistillError, match="config differs from the checkpoint's in lr_student"):
        other.resume(checkpoint)


def test_nan_loss_stops_with_its_name_and_keeps_the_last_good_checkpoint(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=4, save_every=1))
    trainer.train_step()
    trainer.save_checkpoint()
    good = trainer.last_checkpoint.read_bytes()
    monkeypatch.setattr(trainer_module, "latent_mse", lambda a, b: torch.full((a.shape[0],), float("nan")))
    with pytest.raises(
        TrainingDiverged,
        match=r"loss 'student/latent_mse' became nan at step 2; the last good checkpoint is .*checkpoint.pt",
    ):
        trainer.train()
    assert trainer.last_checkpoint.read_bytes() == good


def test_previews_arrive_on_schedule(make_trainer):
    class Collect(Callbacks):
        previews = []

        def on_preview(self, step, images):
            self.previews.append((step, images))

    callbacks = Collect()
    make_trainer(_config(steps=2, sample_every=1, echo=False), callbacks=callbacks).train()
    assert [s for s, _ in callbacks.previews] == [1, 2]
    images = callbacks.previews[0][1]
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


# --- the bundle -----------------------------------------------------------------------------------


def test_end_to_end_run_writes_a_bundle_that_applies(make_trainer, tiny_pair_folders, tmp_path):
    trainer = make_trainer(_config(steps=3, target_steps=2))
    bundle = trainer.train()
    path = bundle.save(tmp_path / "concept.safetensors")
    loaded = ConceptBundle.load(path)
    assert loaded.token == "<v*>" and loaded.step == 3 and loaded.config["target_steps"] == 2
    base = trainer.pair.fingerprints()
    assert {k: loaded.fingerprints[k] for k in base} == base and "initializer_rows" in loaded.fingerprints

    fresh = load_model_pair(*tiny_pair_folders)
    loaded.apply(fresh, parts=("student",))
    assert torch.equal(concept_embedding(fresh.text_encoder).concept_row, bundle.embedding)
    for key, value in adapter_state_dict(fresh.student.unet).items():
        assert torch.equal(value, bundle.student_adapter[key])

    swapped = load_model_pair(tiny_pair_folders[1], tiny_pair_folders[0])  # teacher and student exchanged
    with pytest.raises(
        BundleMismatchError, match="trained on a student unet with fingerprint [0-9a-f]{12}, but the loaded one is"
    ):
        loaded.apply(swapped, parts=("student",))
    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["echodistill"])
    assert header["families"] == {"teacher": "teacher", "student": "student"}


def test_training_with_image_backbones_uses_semantic_loss_and_echo_similarity(make_trainer, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    trainer = make_trainer(
        _config(steps=2, discriminators=("teacher_features", "clip_vit_h14"), echo_start=1, echo_every=1),
        backbone_paths={"clip_vit_h14": tmp_path / "clip"},
    )
    logs = trainer.train_step()
    assert {"student/semantic", "student/adv_clip_vit_h14", "heads/clip_vit_h14", "student/ms_swd"} <= set(logs)
    assert logs["echo/kept"] == 2.0
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_gradient_checkpointing_trains(precision, make_trainer):
    trainer = make_trainer(_config(steps=1, mixed_precision=precision, gradient_checkpointing=True, echo=False))
    before = _trained_state(trainer)
    logs = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    after = _trained_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("student."))
    assert trainer.pair.student.unet.is_gradient_checkpointing
    scales = [scaler.get_scale() if scaler.is_enabled() else None for scaler in trainer.scalers.values()]
    assert scales == ([None] * 3 if precision == "bf16" else [65536.0] * 3)  # fp16 scales its losses


def test_echoed_samples_train_the_teacher_but_never_count_as_real(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=3, echo_start=1, echo_every=1))
    trainer.train_step()  # step 1 ends with an echo round
    assert len(trainer.echo) == 2
    teacher_batches, real_batches = [], []
    original_loss = trainer_module.masked_denoising_loss
    original_disc = trainer_module.discriminator_loss

    def spy_loss(prediction, target, mask=None):
        teacher_batches.append(prediction.shape[0])
        return original_loss(prediction, target, mask)

    def spy_disc(real_logits, fake_logits):
        real_batches.append(real_logits.shape[0])
        return original_disc(real_logits, fake_logits)

    monkeypatch.setattr(trainer_module, "masked_denoising_loss", spy_loss)
    monkeypatch.setattr(trainer_module, "discriminator_loss", spy_disc)
    trainer.train_step()
    assert teacher_batches == [2 + 1]  # two real photos + one echoed sample (echo_per_step)
    assert real_batches == [2]  # the heads' "real" side is the photos alone


def test_the_echo_draws_the_configs_own_contexts(make_trainer):
    default = make_trainer(_config(steps=2, echo_start=1, echo_every=1))
    default.train_step()
    assert all(p.startswith("a photo of a <v*> dog ") for p in default.echo.prompts)  # the SD scenes by default
    contexts = ("a small {} on the left, on a plain red background", "a large {} at the top, on a blue background")
    own = make_trainer(_config(steps=2, echo_start=1, echo_every=1, echo_prompts=contexts))
    own.train_step()
    assert len(own.echo) == 2 and set(own.echo.prompts) <= {c.replace("{}", "<v*> dog") for c in contexts}


def test_echo_prompts_are_checked():
    with pytest.raises(ConfigError, match=r"echo_prompts=\[\] must list at least one prompt"):
        TrainConfig(echo_prompts=())
    with pytest.raises(ConfigError, match=r"echo_prompts=\[\.\.\., 'in the snow', \.\.\.\]: that prompt has 0 '{}' "
                                          "placeholders; each needs exactly one"):
        TrainConfig(echo_prompts=("a photo of a {} on a beach", "in the snow"))
    assert TrainConfig.from_json(TrainConfig(echo_prompts=("a {} at the zoo",)).to_json()).echo_prompts == (
        "a {} at the zoo",)


def test_a_failing_callback_still_leaves_a_checkpoint(make_trainer):
    class Broken(Callbacks):
        def on_progress(self, step, total, logs):
            if step == 2:
                raise RuntimeError("the UI went away")

    trainer = make_trainer(_config(steps=4, echo=False), callbacks=Broken())
    with pytest.raises(RuntimeError, match="the UI went away"):
        trainer.train()
    assert trainer.last_checkpoint.is_file()
    resumed = make_trainer(_config(steps=4, echo=False))
    resumed.resume(trainer.last_checkpoint)
    assert resumed.step == 2


def test_echo_ranks_samples_by_realness_and_closeness_to_the_references(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=1, echo_samples=6, echo_keep_ratio=0.5))
    with torch.no_grad():
        references = trainer.dataset.reference_pixel_values()
        vae = trainer.pair.vae
        reference_latents = vae.encode(references).latent_dist.mean * vae.config.scaling_factor
        far = torch.randn_like(reference_latents) * 5
        close = trainer._reference_similarity(reference_latents, None)
        away = trainer._reference_similarity(far, None)
    assert close.shape == (3,) and bool((close > away).all())
    kept = trainer.echo_round()
    assert kept == 3 and len(trainer.echo) == 3
    assert all("<v*> dog" in prompt for prompt in trainer.echo.prompts)


# --- ablations: sequential schedule, no adversarial loss, no shared text encoder -------------------


def test_ablation_options_are_validated_and_round_trip():
    config = _config(schedule="sequential", echo=False, shared_text_encoder=False)
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.teacher_phase_steps == 2 and _config(steps=5).teacher_phase_steps == 5
    with pytest.raises(ConfigError, match="schedule='alternating' is not one of 'joint', 'sequential'"):
        _config(schedule="alternating")
    with pytest.raises(ConfigError, match="schedule='sequential' with echo=True: .* set echo=False"):
        _config(schedule="sequential")
    with pytest.raises(ConfigError, match="schedule='sequential' needs steps >= 2 .* got steps=1"):
        _config(schedule="sequential", echo=False, steps=1)
    assert TrainConfig().shared_text_encoder and TrainConfig().schedule == "joint"


def _applied_optimizers(trainer: Trainer, monkeypatch) -> list[str]:
    names = {id(trainer.teacher_optimizer): "teacher", id(trainer.student_optimizer): "student",
             id(trainer.heads_optimizer): "heads"}
    applied = []
    original = Trainer._apply

    def spy(self, optimizer):
        applied.append(names[id(optimizer)])
        original(self, optimizer)

    monkeypatch.setattr(Trainer, "_apply", spy)
    return applied


def test_sequential_trains_the_teacher_alone_then_the_student_against_the_frozen_teacher(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=4, schedule="sequential", echo=False))
    applied = _applied_optimizers(trainer, monkeypatch)
    start = _trained_state(trainer)
    phase_one_logs = [trainer.train_step() for _ in range(2)]
    middle = _trained_state(trainer)
    assert applied == ["teacher", "teacher"]
    assert all(set(logs) == {"teacher/denoise", "loss/teacher"} for logs in phase_one_logs)
    for key in start:  # phase 1: the teacher and the token move; the student and the heads wait
        moved = not torch.equal(start[key], middle[key])
        assert moved == (key.startswith("teacher.") or key == "row"), key

    phase_two_logs = [trainer.train_step() for _ in range(2)]
    end = _trained_state(trainer)
    assert applied[2:] == ["student", "heads", "student", "heads"]
    assert all("loss/teacher" not in logs and {"loss/student", "loss/heads"} <= set(logs) for logs in phase_two_logs)
    for key in middle:  # phase 2: the teacher and the token are frozen
        moved = not torch.equal(middle[key], end[key])
        assert moved == (key.startswith("student.") or key.startswith("heads.")), key
    assert not any(p.grad is not None for p in concept_embedding(trainer.pair.text_encoder).parameters())


def test_sequential_resume_refuses_a_changed_step_count(make_trainer, tmp_path):
    trainer = make_trainer(_config(steps=4, schedule="sequential", echo=False))
    trainer.train_step()
    checkpoint = trainer.save_checkpoint(tmp_path / "s.pt")
    longer = make_trainer(_config(steps=6, schedule="sequential", echo=False))
    with pytest.raises(EchoDistillError, match="differs from the checkpoint's in steps"):
        longer.resume(checkpoint)


def test_without_adversarial_weight_no_head_trains_and_echo_ranks_by_similarity(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=2, weight_adversarial=0.0, echo_start=1, echo_every=1))
    applied = _applied_optimizers(trainer, monkeypatch)
    heads_before = trainer.ensemble.heads_state_dict()
    monkeypatch.setattr(trainer.ensemble, "forward", lambda **_: pytest.fail("the heads were evaluated"))
    logs = trainer.train_step()
    assert applied == ["teacher", "student"]
    assert not any(k.startswith(("heads/", "student/adv_")) for k in logs) and "loss/heads" not in logs
    assert logs["echo/kept"] == 2.0 and len(trainer.echo) == 2
    for key, value in trainer.ensemble.heads_state_dict().items():
        assert torch.equal(value, heads_before[key]), key


def test_without_shared_encoder_the_student_trains_its_own_token_row(make_trainer, monkeypatch):
    trainer = make_trainer(_config(steps=1, shared_text_encoder=False, echo=False))
    teacher_row = concept_embedding(trainer.pair.text_encoder).concept_row
    student_row = trainer.student_row.concept_row
    assert student_row is not teacher_row and torch.equal(student_row, teacher_row)  # both start at the class word
    grads = []
    original = Trainer._apply

    def spy(self, optimizer):
        grads.append((teacher_row.grad is not None and bool(teacher_row.grad.abs().sum() > 0),
                      student_row.grad is not None and bool(student_row.grad.abs().sum() > 0)))
        original(self, optimizer)

    monkeypatch.setattr(Trainer, "_apply", spy)
    teacher_before, student_before = teacher_row.detach().clone(), student_row.detach().clone()
    trainer.train_step()
    teacher_step, student_step, heads_step = grads
    assert teacher_step == (True, False)  # the teacher's loss reaches its row only
    assert student_step == (False, True)  # the student's losses reach the student's row, never the teacher's
    assert heads_step == (False, False)
    assert not torch.equal(teacher_row, teacher_before) and not torch.equal(student_row, student_before)
    # The student's row lives beside the encoder, not in it: the encoder still reads the teacher's row.
    assert concept_embedding(trainer.pair.text_encoder).concept_row is teacher_row


def test_the_token_row_trains_at_its_own_rate_when_one_is_given(make_trainer):
    # 0 (the default): the row in one AdamW group with the teacher's adapters, at their rate, as published
    published = make_trainer(_config(steps=1, echo=False))
    assert [group["lr"] for group in published.teacher_optimizer.param_groups] == [1e-5]
    own = make_trainer(_config(steps=1, echo=False, lr_token=1e-2))
    row = concept_embedding(own.pair.text_encoder).concept_row
    adapters, rows = own.teacher_optimizer.param_groups
    assert (adapters["lr"], rows["lr"]) == (1e-5, 1e-2) and rows["params"] == [row]
    assert all(p is not row for p in adapters["params"]) and len(own.student_optimizer.param_groups) == 1
    before = row.detach().clone()
    own.train_step()
    # Adam's first step moves each element with a gradient by the rate (weight decay adds lr * 1e-2 * |row|)
    moved = (row.detach() - before).abs()
    assert moved.max().item() == pytest.approx(1e-2, rel=0.05) and (moved > 5e-3).float().mean() > 0.5
    # The student's own row (no shared encoder) trains at the same rate, beside the student's adapters.
    apart = make_trainer(_config(steps=1, echo=False, shared_text_encoder=False, lr_token=3e-3))
    student_adapters, student_rows = apart.student_optimizer.param_groups
    assert student_adapters["lr"] == 2e-5 and student_rows["lr"] == 3e-3
    assert student_rows["params"] == [apart.student_row.concept_row]


def test_the_token_rows_rate_is_checked_like_every_rate():
    with pytest.raises(ConfigError, match="lr_token=-0.001 must not be negative"):
        TrainConfig(lr_token=-1e-3)
    with pytest.raises(ConfigError, match="lr_token=2 must be at most 1"):
        TrainConfig(lr_token=2)
    assert TrainConfig(lr_token=1e-3).lr_token == 1e-3 and TrainConfig().lr_token == 0.0


def test_separate_token_rows_checkpoint_and_bundle_round_trip(make_trainer, tiny_pair_folders, tmp_path):
    from echodistill.jobs.runs import sample

    config = _config(steps=2, shared_text_encoder=False, echo_start=1, echo_every=1)
    trainer = make_trainer(config)
    trainer.train_step()
    checkpoint = trainer.save_checkpoint(tmp_path / "half.pt")
    trainer.train_step()
    resumed = make_trainer(config)
    resumed.resume(checkpoint)
    resumed.train_step()
    assert torch.equal(resumed.student_row.concept_row, trainer.student_row.concept_row)

    bundle = trainer.bundle()
    assert not torch.equal(bundle.student_embedding, bundle.embedding)
    loaded = ConceptBundle.load(bundle.save(tmp_path / "concept.safetensors"))
    assert torch.equal(loaded.student_embedding, bundle.student_embedding)
    assert torch.equal(loaded.embedding_for("teacher"), bundle.embedding)
    # What the trainer's previews showed is what the saved concept samples, through the student's own row.
    preview = trainer.preview()
    fresh = load_model_pair(*tiny_pair_folders)
    prompt = previews.PREVIEW_PROMPT.format(token="<v*>", class_word="dog")
    images = sample(fresh, [prompt] * 2, concept=loaded, seeds=[0, 1], width=64, height=64, return_latents=False)
    assert torch.allclose(images.images, preview, atol=1e-6)
    loaded.apply(fresh, parts=("teacher",))
    assert torch.equal(concept_embedding(fresh.text_encoder).concept_row, bundle.embedding)
    with pytest.raises(EchoDistillError, match="trained without a shared text encoder.*apply one part at a time"):
        loaded.apply(load_model_pair(*tiny_pair_folders))
