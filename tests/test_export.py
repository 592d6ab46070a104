"""Export of a concept bundle for core ComfyUI nodes: kohya LoRA (diff / lowrank) and embedding."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from echodistill import __version__
from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import (
    EXPORT_METADATA_KEY,
    ExportError,
    OutputExistsError,
    RankWarning,
    bundle_deltas,
    export_concept,
    export_embedding,
    export_lora,
)
from echodistill.concepts.reference import apply_kohya_lora
from echodistill.models import tiny
from echodistill.models.adapters import WeightDelta, adapter_state_dict, add_custom_diffusion, add_lora, kv_deltas
from echodistill.models.pair import load_model_pair
from echodistill.training.config import TrainConfig
from echodistill.training.data import load_concept_images
from echodistill.training.trainer import Trainer


def _hand_bundle(pair, adapter: str, seed: int = 0) -> ConceptBundle:
    """A bundle over the tiny pair's real fingerprints, with random (far from zero) adapter weights."""
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for part in ("student", "teacher"):
        unet = getattr(pair, part).unet
        if adapter == "custom_diffusion":
            add_custom_diffusion(unet)
        else:
            add_lora(unet, 3, 6.0, ("attn2.to_k", "attn2.to_v"))
        state = adapter_state_dict(unet)
        states[part] = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in state.items()}
    width = pair.text_encoder.config.hidden_size
    return ConceptBundle(
        token="<v*>",
        initializer="dog",
        class_word="dog",
        embedding=torch.randn(width, generator=generator),
        adapter=adapter,
        student_adapter=states["student"],
        teacher_adapter=states["teacher"],
        fingerprints=pair.fingerprints(),
        families={"teacher": pair.teacher.family, "student": pair.student.family},
        config={"adapter": adapter, "lora_rank": 3, "lora_alpha": 6.0, "lora_targets": ["attn2.to_k", "attn2.to_v"]},
        step=7,
    )


@pytest.fixture
def cd_bundle(tiny_pair_folders):
    return _hand_bundle(load_model_pair(*tiny_pair_folders), "custom_diffusion")


@pytest.fixture
def lora_bundle(tiny_pair_folders):
    return _hand_bundle(load_model_pair(*tiny_pair_folders), "lora", seed=1)


def _fresh_unet(pair_folders, part="student"):
    return getattr(load_model_pair(*pair_folders), part).unet


def _applied(bundle, pair_folders, part="student"):
    """The bundle's adapters installed on a fresh pair, the way users apply a bundle."""
    fresh = load_model_pair(*pair_folders)
    bundle.apply(fresh, parts=(part,))
    return getattr(fresh, part).unet


def _linear_weights(unet) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}


# --- diff -----------------------------------------------------------------------------------------


def test_diff_export_reproduces_the_bundle_applied_student_exactly(cd_bundle, tiny_pair_folders, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "concept_diff.safetensors", mode="diff")
    state = load_file(report.path)
    assert report.layers == len(cd_bundle.student_adapter) and report.max_error == 0.0 and report.rank is None
    assert all(k.startswith("lora_unet_") and k.endswith(".diff") for k in state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.diff" in state

    base = _fresh_unet(tiny_pair_folders)
    before = _linear_weights(base)
    patched = apply_kohya_lora(base, state)  # raises if any key maps to no module
    assert len(patched) == len(state)

    applied = _applied(cd_bundle, tiny_pair_folders)
    merged = {n: m.merged_weight() for n, m in applied.named_modules() if isinstance(m, WeightDelta)}
    assert set(merged) == set(patched)
    after = _linear_weights(base)
    for name, weight in after.items():
        if name in merged:
            torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6)
            assert not torch.equal(weight, before[name])
        else:
            assert torch.equal(weight, before[name]), f"{name} was patched but is not adapted"

    # Same network: the patched base UNet predicts what the bundle-applied student predicts.
    torch.manual_seed(0)
    sample, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = applied(sample, 10, encoder_hidden_states=hidden).sample
        got = base(sample, 10, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_teacher_part_exports_the_teacher_deltas(cd_bundle, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "teacher.safetensors", part="teacher", mode="diff")
    state = load_file(report.path)
    for module, delta in bundle_deltas(cd_bundle, "teacher").items():
        key = "lora_unet_" + module.replace(".", "_") + ".diff"
        assert torch.equal(state[key], delta)
    info = json.loads(report.metadata[EXPORT_METADATA_KEY])
    assert info["part"] == "teacher" and info["base_unet_fingerprint"] == cd_bundle.fingerprints["teacher_unet"]
    with pytest.raises(ExportError, match="part='vae' is not one of 'student', 'teacher'"):
        export_lora(cd_bundle, tmp_path / "x.safetensors", part="vae")


# --- lowrank --------------------------------------------------------------------------------------


def test_full_rank_lowrank_export_reproduces_the_deltas(cd_bundle, tiny_pair_folders, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "full.safetensors", mode="lowrank")  # rank None: full
    assert report.rank == 32 and report.max_error < 1e-6
    state = load_file(report.path)
    key = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v"
    assert state[f"{key}.lora_down.weight"].shape == (32, 32) and state[f"{key}.lora_up.weight"].shape == (64, 32)
    assert state[f"{key}.alpha"].ndim == 0 and float(state[f"{key}.alpha"]) == 32.0

    base = _fresh_unet(tiny_pair_folders)
    apply_kohya_lora(base, state)
    applied = _applied(cd_bundle, tiny_pair_folders)
    merged = {n: m.merged_weight() for n, m in applied.named_modules() if isinstance(m, WeightDelta)}
    weights = _linear_weights(base)
    for name, weight in merged.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-5)


def test_rank_one_export_reports_the_svd_tail_energy(cd_bundle, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "r1.safetensors", mode="lowrank", rank=1)
    deltas = bundle_deltas(cd_bundle, "student")
    independent = {}
    for module, delta in deltas.items():
        singular = np.linalg.svd(delta.double().numpy(), compute_uv=False)
        independent[module] = float(np.sqrt((singular[1:] ** 2).sum() / (singular**2).sum()))
    assert set(report.errors) == set(independent)
    for module, error in report.errors.items():
        assert error == pytest.approx(independent[module], rel=1e-5)
    assert report.max_error == pytest.approx(max(independent.values()), rel=1e-5)
    assert report.mean_error == pytest.approx(np.mean(list(independent.values())), rel=1e-5)
    assert 0.5 < report.mean_error < 1.0  # random 32x32 deltas: rank 1 keeps little
    state = load_file(report.path)
    assert all(v.shape[0] == 1 for k, v in state.items() if k.endswith("lora_down.weight"))
    print(f"\nrank-1 relative error: max {report.max_error:.6f}, mean {report.mean_error:.6f}")


def test_a_rank_above_what_the_layers_hold_warns_once_naming_both_ranks(cd_bundle, lora_bundle, tmp_path, capsys):
    layers = len(bundle_deltas(cd_bundle, "student"))  # tiny K/V: (32 or 64, 32), so full rank is 32
    with pytest.warns(RankWarning) as caught:
        report = export_lora(cd_bundle, tmp_path / "r40.safetensors", rank=40)
    assert [str(w.message) for w in caught] == [
        f"rank 40 was asked for, but {layers} of {layers} layers hold less: they are written at the full rank of their "
        "ΔW (32), which is exact; a rank of 32 or less fits every layer"]
    assert report.rank == 32 and report.max_error < 1e-6
    with pytest.warns(RankWarning, match=r"^rank 5 was asked for, .* of their ΔW \(3\), which is exact"):
        assert export_lora(lora_bundle, tmp_path / "lora5.safetensors", rank=5).rank == 3  # its own LoRA factors
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankWarning)
        export_lora(cd_bundle, tmp_path / "r32.safetensors", rank=32)  # what every layer holds: nothing to say
        export_lora(lora_bundle, tmp_path / "lora3.safetensors", rank=3)

    from echodistill.cli import main

    concept = cd_bundle.save(tmp_path / "c.safetensors")
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "loras"), "--rank", "40"]) == 0
    err = capsys.readouterr().err
    assert err == (f"warning: rank 40 was asked for, but {layers} of {layers} layers hold less: they are written at "
                   "the full rank of their ΔW (32), which is exact; a rank of 32 or less fits every layer\n")


def test_peft_lora_bundle_converts_exactly(lora_bundle, tiny_pair_folders, tmp_path):
    report = export_lora(lora_bundle, tmp_path / "lora.safetensors", mode="lowrank")
    assert report.rank == 3 and report.max_error == 0.0
    assert report.metadata["ss_network_dim"] == "3" and report.metadata["ss_network_alpha"] == "6.0"
    state = load_file(report.path)
    module = "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"
    key = "lora_unet_" + module.replace(".", "_")
    trained = lora_bundle.student_adapter
    assert torch.equal(state[f"{key}.lora_down.weight"], trained[f"{module}.lora_A.echodistill.weight"])
    assert torch.equal(state[f"{key}.lora_up.weight"], trained[f"{module}.lora_B.echodistill.weight"])
    assert float(state[f"{key}.alpha"]) == 6.0

    applied = _applied(lora_bundle, tiny_pair_folders)
    # the peft-wrapped student's effective weights: base + alpha/r * B @ A
    expected = {n: applied.get_submodule(n).get_base_layer().weight + d for n, d in kv_deltas(applied).items()}
    base = _fresh_unet(tiny_pair_folders)
    apply_kohya_lora(base, state)
    weights = _linear_weights(base)
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-6)

    # diff mode of a LoRA bundle writes the same ΔW densely; a lower rank is fitted by SVD.
    diff = export_lora(lora_bundle, tmp_path / "lora_diff.safetensors", mode="diff")
    base = _fresh_unet(tiny_pair_folders)
    apply_kohya_lora(base, load_file(diff.path))
    for name, weight in _linear_weights(base).items():
        if name in expected:
            torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6)
    squeezed = export_lora(lora_bundle, tmp_path / "lora_r2.safetensors", mode="lowrank", rank=2)
    assert squeezed.rank == 2 and 0 < squeezed.max_error < 1


def test_a_trained_lora_run_exports_keys_that_all_map(tiny_pair_folders, tmp_path):
    pictures = [Image.new("RGB", (64, 64), (200, 40 * i, 60)) for i in range(2)]
    config = TrainConfig(
        steps=2, batch_size=1, resolution=64, class_word="dog", adapter="lora", echo=False,
        sample_every=0, save_every=0, ms_swd_projections=8, ms_swd_scales=2,
    )  # fmt: skip
    bundle = Trainer(load_model_pair(*tiny_pair_folders), load_concept_images(pictures, resolution=64), config).train()
    report = export_lora(bundle, tmp_path / "trained.safetensors", mode="lowrank")
    base = _fresh_unet(tiny_pair_folders)
    patched = apply_kohya_lora(base, load_file(report.path))
    assert len(patched) == report.layers == len(bundle.student_adapter) // 2
    assert report.max_error == 0.0 and report.rank == config.lora_rank
    assert bundle.unet_configs["student"]["block_out_channels"] == list(base.config.block_out_channels)  # stored


def test_export_checks_a_bundle_against_the_unet_config_it_stored(cd_bundle, tiny_pair_folders, tmp_path):
    """An edited bundle (a ΔW or token row of another shape) is refused with no --unet-config given."""
    pair = load_model_pair(*tiny_pair_folders)
    stored = {part: json.loads(json.dumps(dict(getattr(pair, part).unet.config))) for part in ("teacher", "student")}
    bundle = dataclasses.replace(cd_bundle, unet_configs=stored)
    assert export_lora(bundle, tmp_path / "ok.safetensors").layers > 0
    export_embedding(bundle, tmp_path / "ok_embedding.safetensors")

    key = sorted(bundle.student_adapter)[0]
    narrow = {**bundle.student_adapter, key: bundle.student_adapter[key][..., :-8]}
    with pytest.raises(ExportError, match=r"ΔW has shape .* but the student UNet it was trained on's weight is \(\d+, \d+\) \(its config, stored in "
                       r"the bundle\): the bundle was edited or damaged"):
        export_lora(dataclasses.replace(bundle, student_adapter=narrow), tmp_path / "narrow.safetensors")
    assert not (tmp_path / "narrow.safetensors").exists()
    wide_row = dataclasses.replace(bundle, embedding=torch.randn(40))
    with pytest.raises(ExportError, match="embedding row is 40 wide but the student it was trained on reads 32-wide"):
        export_embedding(wide_row, tmp_path / "wide.safetensors")
    assert not (tmp_path / "wide.safetensors").exists()
    with pytest.raises(ExportError, match="embedding row is 40 wide"):  # both files, or neither
        export_concept(wide_row, "wide", tmp_path / "loras", tmp_path / "embeddings")
    assert not list(tmp_path.glob("loras/*")) and not list(tmp_path.glob("embeddings/*"))
    negative = {**stored["student"], "cross_attention_dim": -3}  # a config no UNet can be built from
    with pytest.raises(ExportError, match="the UNet config does not build a diffusers UNet"):
        export_lora(dataclasses.replace(bundle, unet_configs={"student": negative}), tmp_path / "n.safetensors")
    quoted = {**stored["student"], "in_channels": "4"}  # once an unrelated formatting TypeError inside torch
    with pytest.raises(ExportError, match=r'^the UNet config does not build a diffusers UNet \(in_channels is "4", '
                                          r"not a whole number of at least 1\): give the config.json of the UNet"):
        export_lora(dataclasses.replace(bundle, unet_configs={"student": quoted}), tmp_path / "q.safetensors")
    sdxl_config = {**stored["student"], "addition_embed_type": "text_time"}
    with pytest.raises(ExportError, match="stored student UNet config is not the diffusers config of an SD 1.x / 2.x"):
        export_lora(dataclasses.replace(bundle, unet_configs={"student": sdxl_config}), tmp_path / "x.safetensors")


# --- key mapping and refusals -----------------------------------------------------------------------


def test_apply_refuses_keys_that_map_nowhere(tiny_pair_folders):
    base = _fresh_unet(tiny_pair_folders)
    before = _linear_weights(base)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    with pytest.raises(ExportError, match="lora_unet_down_blocks_9_attn2_to_k.diff maps to no Linear or conv layer"):
        apply_kohya_lora(
            base, {f"{good}.diff": torch.zeros(32, 32), "lora_unet_down_blocks_9_attn2_to_k.diff": torch.zeros(1)}
        )
    with pytest.raises(ExportError, match="unknown kohya key suffix 'lora_mid.weight'"):
        apply_kohya_lora(base, {f"{good}.lora_mid.weight": torch.zeros(1)})
    with pytest.raises(ExportError, match="has only one of lora_up.weight / lora_down.weight"):
        apply_kohya_lora(base, {f"{good}.lora_up.weight": torch.zeros(32, 2)})
    with pytest.raises(ExportError, match="patch shape \\(3, 3\\) != weight \\(32, 32\\)"):
        apply_kohya_lora(base, {f"{good}.diff": torch.zeros(3, 3)})
    assert all(torch.equal(w, before[n]) for n, w in _linear_weights(base).items())  # nothing half-applied


def test_unet_config_check_catches_a_foreign_unet(cd_bundle, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "ok.safetensors", unet_config=tiny.unet_config(32))
    assert report.layers > 0
    with pytest.raises(ExportError, match="ΔW has shape \\(32, 32\\) but the given UNet's weight is \\(32, 24\\)"):
        export_lora(cd_bundle, tmp_path / "bad.safetensors", unet_config=tiny.unet_config(24))
    assert not (tmp_path / "bad.safetensors").exists()


def test_exports_refuse_to_overwrite(cd_bundle, tmp_path):
    lora_path, embed_path = tmp_path / "c.safetensors", tmp_path / "e.safetensors"
    export_lora(cd_bundle, lora_path)
    export_embedding(cd_bundle, embed_path)
    stamp = lora_path.read_bytes(), embed_path.read_bytes()
    with pytest.raises(OutputExistsError, match="c.safetensors already exists; pass overwrite=True"):
        export_lora(cd_bundle, lora_path, mode="lowrank", rank=1)
    with pytest.raises(FileExistsError, match="e.safetensors already exists"):
        export_embedding(cd_bundle, embed_path)
    assert (lora_path.read_bytes(), embed_path.read_bytes()) == stamp
    export_lora(cd_bundle, lora_path, mode="lowrank", rank=1, overwrite=True)
    assert any(k.endswith(".lora_up.weight") for k in load_file(lora_path))
    with pytest.raises(ExportError, match="name it \\*.safetensors"):
        export_lora(cd_bundle, tmp_path / "c.pt")
    with pytest.raises(ExportError, match="mode='dense' is not one of 'diff', 'lowrank'"):
        export_lora(cd_bundle, tmp_path / "d.safetensors", mode="dense")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "e.safetensors"]  # no temp leftovers


# --- metadata and embedding -------------------------------------------------------------------------


def _header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_lora_header_describes_the_export(cd_bundle, tmp_path):
    report = export_lora(cd_bundle, tmp_path / "m.safetensors", mode="lowrank", rank=4)
    header = _header(report.path)
    assert header == report.metadata
    info = json.loads(header[EXPORT_METADATA_KEY])
    assert info["token"] == "<v*>" and info["class_word"] == "dog" and info["step"] == 7
    assert info["fingerprints"] == cd_bundle.fingerprints and info["pack_version"] == __version__
    assert info["base_unet_fingerprint"] == cd_bundle.fingerprints["student_unet"]
    assert info["mode"] == "lowrank" and info["max_relative_error"] == pytest.approx(report.max_error)
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "4.0" and header["ss_steps"] == "7"
    assert "ss_base_model_version" not in header  # a 32-wide tiny text encoder is no SD version

    diff_header = _header(export_lora(cd_bundle, tmp_path / "d.safetensors", mode="diff").path)
    assert "ss_network_dim" not in diff_header and json.loads(diff_header[EXPORT_METADATA_KEY])["mode"] == "diff"
    for width, version in ((1024, "sd_v2"), (768, "sd_v1")):
        wide = dataclasses.replace(cd_bundle, embedding=torch.zeros(width))
        header = export_lora(wide, tmp_path / f"w{width}.safetensors").metadata
        assert header["ss_base_model_version"] == version and header["ss_v2"] == str(width == 1024)


@pytest.mark.parametrize("width", [32, 1024, 768])
def test_embedding_file_key_shape_and_values(cd_bundle, tmp_path, width):
    # One tensor keyed by the token: diffusers registers that token, ComfyUI / A1111 take the one tensor,
    # InvokeAI counts one vector from the first dimension.
    key = cd_bundle.token
    bundle = cd_bundle if width == 32 else dataclasses.replace(cd_bundle, embedding=torch.randn(width))
    path = export_embedding(bundle, tmp_path / "my_dog.safetensors")
    state = load_file(path)
    assert list(state) == [key] and state[key].shape == (1, width) and state[key].dtype == torch.float32
    assert torch.equal(state[key][0], bundle.embedding.float())
    info = json.loads(_header(path)[EXPORT_METADATA_KEY])
    assert info["token"] == "<v*>" and info["text_encoder_fingerprint"] == bundle.fingerprints["text_encoder"]
