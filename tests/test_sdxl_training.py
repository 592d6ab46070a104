"""The one Trainer on a tiny SDXL pair: what each loss reaches, resume, bundles with clip_l / clip_g rows."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from echodistill.concepts.bundle import BundleMismatchError, ConceptBundle
from echodistill.concepts.export import ExportError, export_embedding, export_lora
from echodistill.models.adapters import WeightDelta, adapter_state_dict
from echodistill.models.concept import concept_embedding
from echodistill.models.conditioning import Conditioning
from echodistill.models.pair import load_model_pair
from echodistill.training.config import TrainConfig
from echodistill.training.discriminators.teacher_features import TeacherFeatureDiscriminator
from echodistill.training.trainer import Trainer

from test_trainer import _images  # the same three photos as the SD 2.x trainer tests


def _config(**changes) -> TrainConfig:
    base = dict(steps=4, batch_size=2, resolution=64, class_word="dog", echo_start=2, echo_every=2, echo_samples=4,
                echo_keep_ratio=0.5, sample_every=0, save_every=0, ms_swd_projections=8, ms_swd_scales=2)
    return TrainConfig(**{**base, **changes})


@pytest.fixture
def make_trainer(tiny_sdxl_folders, tmp_path):
    def make(config: TrainConfig | None = None, **kwargs) -> Trainer:
        return Trainer(load_model_pair(*tiny_sdxl_folders), _images(), config or _config(), run_dir=tmp_path / "run",
                       **kwargs)

    return make


def _trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    pair = trainer.pair
    state = {f"teacher.{k}": v for k, v in adapter_state_dict(pair.teacher.unet).items()}
    state.update({f"student.{k}": v for k, v in adapter_state_dict(pair.student.unet).items()})
    state.update({f"heads.{k}": v for k, v in trainer.ensemble.heads_state_dict().items()})
    state["row_l"] = concept_embedding(pair.text_encoder).concept_row.detach().clone()
    state["row_g"] = concept_embedding(pair.text_encoder_2).concept_row.detach().clone()
    return state


def _names_with_grad(trainer: Trainer) -> set[str]:
    modules = {"teacher": trainer.pair.teacher.unet, "student": trainer.pair.student.unet,
               "text": trainer.pair.text_encoder, "text2": trainer.pair.text_encoder_2, "vae": trainer.pair.vae,
               "heads": trainer.ensemble}
    return {f"{owner}.{name}" for owner, module in modules.items() for name, p in module.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_reaches_only_its_own_parameters_and_both_token_rows_train_with_the_teacher(make_trainer,
                                                                                               monkeypatch):
    trainer = make_trainer(_config(steps=1, echo=False))
    pair = trainer.pair
    for unet in (pair.teacher.unet, pair.student.unet):  # K/V of every cross-attention layer, and nothing else
        wrapped = [n for n, m in unet.named_modules() if isinstance(m, WeightDelta)]
        assert len(wrapped) == 2 * sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in wrapped)
    assert [tuple(p.shape) for p in trainer.teacher_optimizer.param_groups[0]["params"][-2:]] == [(24,), (32,)]
    # The discriminator on the teacher's features reads SDXL's added conditioning too.
    member = trainer.ensemble.members["teacher_features"]
    assert isinstance(member, TeacherFeatureDiscriminator)
    seen, features_conds = [], []
    original_apply, original_features = Trainer._apply, TeacherFeatureDiscriminator.features

    def spy(self, optimizer):
        seen.append(_names_with_grad(self))
        original_apply(self, optimizer)

    def features_spy(self, latents, timesteps, cond):
        features_conds.append(cond)
        return original_features(self, latents, timesteps, cond)

    monkeypatch.setattr(Trainer, "_apply", spy)
    monkeypatch.setattr(TeacherFeatureDiscriminator, "features", features_spy)
    trainer.train_step()
    teacher_step, student_step, heads_step = seen
    rows = {n for n in teacher_step if n.endswith("concept_row")}
    assert {n.split(".")[0] for n in rows} == {"text", "text2"}  # one row in each encoder, from the teacher's loss
    assert all(n.startswith("teacher.") and n.endswith(".delta") or n in rows for n in teacher_step)
    assert any(n.startswith("teacher.") for n in teacher_step)
    assert any(n.startswith("student.") for n in student_step)
    assert all(n.startswith("student.") and n.endswith(".delta") or n.startswith("heads.") for n in student_step)
    assert heads_step and all(n.startswith("heads.") for n in heads_step)
    assert features_conds and all(isinstance(c, Conditioning) and c.time_ids is not None for c in features_conds)
    assert features_conds[0].time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]


def test_frozen_weights_of_both_encoders_stay_bit_for_bit_and_previews_draw(make_trainer):
    trainer = make_trainer(_config(steps=2, echo_start=1, echo_every=1))
    pair = trainer.pair
    modules = [pair.teacher.unet, pair.student.unet, pair.vae, pair.text_encoder, pair.text_encoder_2]
    before = [{n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad} for m in modules]
    trained_before = _trained_state(trainer)
    trainer.train()
    for module, frozen in zip(modules, before):
        after = {n: p for n, p in module.named_parameters() if not p.requires_grad}
        assert after.keys() == frozen.keys() and all(torch.equal(after[k], v) for k, v in frozen.items())
    trained_after = _trained_state(trainer)
    changed = {k for k in trained_before if not torch.equal(trained_before[k], trained_after[k])}
    assert {"row_l", "row_g"} <= changed and len(trainer.echo) > 0
    preview = trainer.preview(2)
    assert preview.shape == (2, 3, 64, 64) and torch.isfinite(preview).all()


@pytest.mark.parametrize("shared", [True, False])
def test_resumed_sdxl_run_reproduces_the_uninterrupted_run_exactly(shared, make_trainer, tmp_path):
    full = make_trainer(_config(steps=4, shared_text_encoder=shared))  # echoes at step 2, after the resume point
    full.train()
    expected = _trained_state(full)
    first = make_trainer(_config(steps=2, shared_text_encoder=shared))
    first.train()
    checkpoint = first.save_checkpoint(tmp_path / "half.pt")
    second = make_trainer(_config(steps=4, shared_text_encoder=shared))
    second.resume(checkpoint)
    assert second.step == 2
    second.train()
    got = _trained_state(second)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    if not shared:  # the student's own rows, in both encoders, are resumed too
        for mine, theirs in zip(second.student_rows, full.student_rows):
            assert torch.equal(mine.concept_row, theirs.concept_row)


def test_sdxl_bundle_stores_clip_l_and_clip_g_and_applies_only_to_sdxl(make_trainer, tiny_sdxl_folders,
                                                                        tiny_pair_folders, tmp_path):
    trainer = make_trainer(_config(steps=2, echo=False, shared_text_encoder=False))
    bundle = trainer.train()
    path = bundle.save(tmp_path / "concept.safetensors")
    with safe_open(str(path), "pt") as handle:
        rows = {k: handle.get_tensor(k) for k in handle.keys() if "." not in k}
    assert {k: tuple(v.shape) for k, v in rows.items()} == {
        "clip_l": (24,), "clip_g": (32,), "student_clip_l": (24,), "student_clip_g": (32,)}
    assert torch.equal(rows["clip_g"], concept_embedding(trainer.pair.text_encoder_2).concept_row)
    loaded = ConceptBundle.load(path)
    assert loaded.is_sdxl and "text_encoder_2" in loaded.fingerprints
    assert [tuple(r.shape) for r in loaded.embeddings_for("teacher")] == [(24,), (32,)]

    fresh = load_model_pair(*tiny_sdxl_folders)
    loaded.apply(fresh, parts=("student",))
    assert torch.equal(concept_embedding(fresh.text_encoder).concept_row, bundle.student_embedding)
    assert torch.equal(concept_embedding(fresh.text_encoder_2).concept_row, bundle.student_embedding_2)
    for key, value in adapter_state_dict(fresh.student.unet).items():
        assert torch.equal(value, bundle.student_adapter[key])
    with pytest.raises(BundleMismatchError,
                       match="trained on an SDXL pair .* but the loaded models are an SD 1.x / 2.x pair"):
        loaded.apply(load_model_pair(*tiny_pair_folders), parts=("student",))
    # Exported as SDXL files: SGM-named LoRA keys and the student's own clip_l / clip_g rows. The tiny family
    # is not shipped, so the keys are named from the UNet configs the bundle stored at training.
    assert loaded.unet_configs["student"]["cross_attention_dim"] == fresh.student.unet.config.cross_attention_dim
    assert loaded.unet_configs["student"]["addition_embed_type"] == "text_time"
    forgotten = ConceptBundle(**{**loaded.__dict__, "unet_configs": {}})  # as saved before configs were stored
    with pytest.raises(ExportError, match="saved without its UNet's config.*pass unet_config="):
        export_lora(forgotten, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    given = export_lora(forgotten, tmp_path / "given.safetensors", unet_config=dict(fresh.student.unet.config))
    report = export_lora(loaded, tmp_path / "out.safetensors")
    assert load_file(given.path).keys() == load_file(report.path).keys()
    assert report.layers == len(bundle.student_adapter) and report.max_error == 0.0  # full rank: ΔW itself, exact
    with safe_open(str(report.path), "pt") as handle:
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in handle.keys())
    with safe_open(str(export_embedding(loaded, tmp_path / "rows.safetensors")), "pt") as handle:
        assert torch.equal(handle.get_tensor("clip_l")[0], bundle.student_embedding)
        assert torch.equal(handle.get_tensor("clip_g")[0], bundle.student_embedding_2)
