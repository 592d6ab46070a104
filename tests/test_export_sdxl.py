"""SDXL export on the tiny SDXL pair: SGM-named kohya LoRA keys, the clip_l / clip_g embedding file,
diffusers' StableDiffusionXLPipeline drawing our student's picture from them, and refusals.

Run with `-s` to see the measured max-abs errors.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import (
    EXPORT_METADATA_KEY,
    ExportError,
    bundle_deltas,
    export_concept,
    export_embedding,
    export_lora,
)
from echodistill.concepts.reference import apply_kohya_lora
from echodistill.jobs.runs import sample
from echodistill.models import tiny
from echodistill.models.adapters import WeightDelta
from echodistill.models.pair import load_model_pair

from test_other_clients import _bundle, diffusers_one_step

PROMPT = "a photo of {} dog"
UNET_PREFIX = "model.diffusion_model."


def _sdxl_bundle(pair, adapter="custom_diffusion", seed=0) -> ConceptBundle:
    """A bundle over the tiny SDXL pair's fingerprints: random (far from zero) adapter weights and both rows."""
    return _bundle(pair, adapter, seed=seed)


@pytest.fixture(scope="module")
def pair(tiny_sdxl_folders):
    return load_model_pair(*tiny_sdxl_folders)


@pytest.fixture(scope="module")
def bundle(pair):
    return _sdxl_bundle(pair)


@pytest.fixture(scope="module")
def unet_config(pair):
    return dict(pair.student.unet.config)


def _header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _comfyui_key_map(state: dict) -> dict[str, str]:
    """kohya stem -> UNet weight key of a single file, by ComfyUI's own rule for the LDM names of a model's
    state dict (comfy/lora.py model_lora_keys_unet): drop the prefix and ".weight", dots to underscores."""
    return {"lora_unet_" + k[len(UNET_PREFIX):-len(".weight")].replace(".", "_"): k
            for k in state if k.startswith(UNET_PREFIX) and k.endswith(".weight")}


def _conditioning(batch=1):
    torch.manual_seed(0)
    sample_in, hidden = torch.randn(batch, 4, 8, 8), torch.randn(batch, 7, 56)  # 56 = 24 + 32, the tiny context
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample_in, hidden, added


# --- key names ------------------------------------------------------------------------------------


def test_sdxl_keys_are_the_sgm_paths_of_the_single_file_and_patch_it_into_the_student(
        bundle, unet_config, tiny_sdxl_world, tiny_sdxl_folders, tmp_path):
    report = export_lora(bundle, tmp_path / "xl_diff.safetensors", mode="diff", unet_config=unet_config)
    lora = load_file(report.path)
    stems = {k.rsplit(".", 1)[0] for k in lora}
    assert report.layers == len(lora) == len(bundle.student_adapter)
    assert not any("down_blocks" in s or "mid_block" in s or "up_blocks" in s for s in stems)
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
                     "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_v",
                     "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
                     "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_v",
                     "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k"):
        assert expected in stems, expected

    # Every key names a weight of the student's SGM single file, by ComfyUI's rule, with ΔW's shape.
    models, family = tiny_sdxl_world["models"]["student"], tiny_sdxl_world["families"]["tiny-sdxl-turbo"]
    state = tiny.single_file_state(models, family, "sgm", "sdxl")
    key_map = _comfyui_key_map(state)
    assert stems <= set(key_map)
    for stem in stems:
        assert lora[f"{stem}.diff"].shape == state[key_map[stem]].shape, stem

    # Patched as ComfyUI patches (W + ΔW on the file's weight), the file loads as the bundle-applied student.
    patched = dict(state)
    for stem in stems:
        patched[key_map[stem]] = state[key_map[stem]] + lora[f"{stem}.diff"]
    path = tmp_path / "patched_turbo.safetensors"
    save_file({k: v.contiguous() for k, v in patched.items()}, str(path))
    loaded = load_model_pair(path, path, teacher_family=family, student_family=family).student.unet
    applied = load_model_pair(*tiny_sdxl_folders)
    bundle.apply(applied, parts=("student",))
    sample_in, hidden, added = _conditioning()
    with torch.no_grad():
        expected = applied.student.unet(sample_in, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        got = loaded(sample_in, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    error = (got - expected).abs().max().item()
    print(f"\nSDXL diff export patched into the SGM file vs bundle-applied student: max |Δ| {error:.2e}")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_reference_applier_reads_sgm_keys_as_comfyui_does(bundle, unet_config, tiny_sdxl_folders, tmp_path):
    report = export_lora(bundle, tmp_path / "xl_lowrank.safetensors", unet_config=unet_config)
    assert report.mode == "lowrank" and report.max_error < 1e-5
    base = load_model_pair(*tiny_sdxl_folders).student.unet
    patched = apply_kohya_lora(base, load_file(report.path))  # raises on a key that maps nowhere
    deltas = bundle_deltas(bundle, "student")
    assert sorted(patched) == sorted(deltas)
    fresh = load_model_pair(*tiny_sdxl_folders)
    bundle.apply(fresh, parts=("student",))
    merged = {n: m.merged_weight() for n, m in fresh.student.unet.named_modules() if isinstance(m, WeightDelta)}
    for name, weight in merged.items():
        torch.testing.assert_close(base.get_submodule(name).weight, weight, rtol=0, atol=1e-5)


def test_sd2_keys_stay_diffusers_paths(tiny_pair_folders, tmp_path):
    """The SD 2.x export is unchanged: diffusers module paths, sd_v2-style header, no model spec."""
    from test_export import _hand_bundle

    sd2 = _hand_bundle(load_model_pair(*tiny_pair_folders), "custom_diffusion")
    report = export_lora(sd2, tmp_path / "sd2.safetensors", mode="diff")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.diff" in load_file(report.path)
    assert not any(k.startswith("modelspec.") for k in report.metadata)


# --- headers and embedding ------------------------------------------------------------------------


def test_sdxl_headers_name_sdxl_for_kohya_and_the_model_spec(bundle, unet_config, tmp_path):
    header = _header(export_lora(bundle, tmp_path / "m.safetensors", unet_config=unet_config).path)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0" and header["ss_v2"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert header["modelspec.sai_model_spec"] == "1.0.0"
    info = json.loads(header[EXPORT_METADATA_KEY])
    assert info["fingerprints"]["text_encoder_2"] == bundle.fingerprints["text_encoder_2"]

    path = export_embedding(bundle, tmp_path / "my_dog.safetensors")
    state = load_file(path)
    assert sorted(state) == ["clip_g", "clip_l"]
    assert state["clip_l"].shape == (1, 24) and state["clip_g"].shape == (1, 32)
    assert torch.equal(state["clip_l"][0], bundle.embedding) and torch.equal(state["clip_g"][0], bundle.embedding_2)
    header = _header(path)
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    info = json.loads(header[EXPORT_METADATA_KEY])
    assert info["token"] == "<v*>" and info["text_encoder_2_fingerprint"] == bundle.fingerprints["text_encoder_2"]


def test_the_student_s_own_rows_are_exported(bundle, tmp_path):
    own = ConceptBundle(**{**bundle.__dict__, "student_embedding": torch.zeros(24),
                           "student_embedding_2": torch.ones(32)})
    state = load_file(export_embedding(own, tmp_path / "own.safetensors"))
    assert torch.equal(state["clip_l"], torch.zeros(1, 24)) and torch.equal(state["clip_g"], torch.ones(1, 32))


# --- diffusers ------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _pipeline(pair_folders) -> tuple[StableDiffusionXLPipeline, object]:
    """A diffusers SDXL pipeline over a fresh copy of the tiny student, built from public classes only."""
    pair = load_model_pair(*pair_folders)
    scheduler = EulerDiscreteScheduler.from_config(pair.student.scheduler_config)
    pipe = StableDiffusionXLPipeline(
        vae=pair.vae, text_encoder=pair.text_encoder, text_encoder_2=pair.text_encoder_2, tokenizer=pair.tokenizer,
        tokenizer_2=pair.tokenizer_2, unet=pair.student.unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, pair


def _load_quietly(pipe, lora_path, embedding_path, token) -> list[str]:
    """Load the LoRA and both embedding rows the documented way; every warning diffusers gave (logged or raised)."""
    handler, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora_path))
            rows = load_file(str(embedding_path))
            pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    finally:
        logger.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught]


@pytest.mark.parametrize("adapter", ["custom_diffusion", "lora"])
def test_diffusers_sdxl_pipeline_draws_our_students_picture(adapter, pair, unet_config, tiny_sdxl_folders, tmp_path):
    bundle = _sdxl_bundle(pair, adapter, seed=3)
    lora = export_lora(bundle, tmp_path / "lora" / "mug.safetensors", unet_config=unet_config)
    embedding = export_embedding(bundle, tmp_path / "embeddings" / "mug.safetensors")
    prompt = PROMPT.format(bundle.token)
    ours = sample(pair, [prompt], concept=bundle, seeds=[11], width=64, height=64)

    pipe, fresh = _pipeline(tiny_sdxl_folders)
    before = {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    messages = _load_quietly(pipe, lora.path, embedding, bundle.token)
    # Only the two notes diffusers gives for any UNet-only LoRA (nothing for the text encoders) and the one
    # transformers gives when a token is added: no missing, unexpected or unconverted keys.
    benign = ("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'",
              "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder_2'",
              "The new embeddings will be initialized from a multivariate normal distribution")
    assert [m for m in messages if not m.startswith(benign)] == [], messages
    # Every exported layer became a peft LoRA layer of the UNet (no missing, no unexpected keys).
    lora_layers = {n.removesuffix(".lora_A") for n, _ in pipe.unet.named_modules()
                   if n.endswith(".lora_A")}
    deltas = bundle_deltas(bundle, "student")
    assert lora_layers == set(deltas), sorted(lora_layers ^ set(deltas))[:4]
    assert pipe.tokenizer.convert_tokens_to_ids(bundle.token) == len(pipe.tokenizer) - 1
    assert pipe.tokenizer_2.convert_tokens_to_ids(bundle.token) == len(pipe.tokenizer_2) - 1

    theirs = diffusers_one_step(pipe, prompt, fresh.student.scheduler_config)
    error = (theirs - ours.images).abs().max().item()
    print(f"\ndiffusers SDXL pipeline ({adapter} export) vs our student: max |Δimage| {error:.2e}")
    # Same fp32 maths, peft's LoRA forward (x·Aᵀ·Bᵀ) against our merged / wrapped layers: round-off only.
    assert error < 1e-4, error
    plain = sample(pair, [PROMPT.format("a")], seeds=[11], width=64, height=64)
    assert (plain.images - ours.images).abs().max().item() > 100 * max(error, 1e-6)
    # Pooled at the real end token (our loader sets 49407): transformers' rule for the published config's
    # eos_token_id 2 pools at the highest id, the added token, and draws another picture (README).
    pipe.text_encoder_2.text_model.eos_token_id = 2
    legacy = diffusers_one_step(pipe, prompt, fresh.student.scheduler_config)
    pipe.text_encoder_2.text_model.eos_token_id = 49407
    assert (legacy - ours.images).abs().max().item() > 100 * max(error, 1e-6)

    # At strength 1: fused, each K/V weight moved by exactly the bundle's ΔW.
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    for name, delta in deltas.items():
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, before[name] + delta, rtol=0, atol=2e-5)


# --- refusals -------------------------------------------------------------------------------------


def test_an_sdxl_concept_and_an_sd2_unet_are_refused_both_ways(bundle, tiny_pair_folders, tmp_path):
    from test_export import _hand_bundle

    with pytest.raises(ExportError, match=r"^this is an SDXL concept \(trained on .*\) but the given UNet config is "
                                          r"an SD 1.x / 2.x UNet \(32-wide cross-attention, without SDXL's"):
        export_lora(bundle, tmp_path / "a.safetensors", unet_config=tiny.unet_config(32))
    sd2 = _hand_bundle(load_model_pair(*tiny_pair_folders), "custom_diffusion")
    with pytest.raises(ExportError, match=r"^this is an SD 1.x / 2.x concept \(trained on teacher \+ student\) "
                                          r"but the given UNet config is an SDXL UNet \(56-wide cross-attention, with "):
        export_lora(sd2, tmp_path / "b.safetensors", unet_config=tiny.sdxl_unet_config())
    for error in ("a", "b"):
        assert not (tmp_path / f"{error}.safetensors").exists()


def test_an_sdxl_concept_needs_its_unet_layout(bundle, tmp_path):
    with pytest.raises(ExportError, match=r"family '.*' is not a shipped one \(sdxl-base, sdxl-turbo\).*pass "
                                          r"unet_config="):
        export_lora(bundle, tmp_path / "c.safetensors")
    # A shipped family's config is used, and checked: the tiny ΔW does not fit the real SDXL-Turbo UNet.
    shipped = ConceptBundle(**{**bundle.__dict__, "families": {"teacher": "sdxl-base", "student": "sdxl-turbo"}})
    with pytest.raises(ExportError, match=r"ΔW has shape \(64, 56\) but the shipped sdxl-turbo UNet's weight is \(640, 2048\): "
                                          r"pass unet_config="):
        export_lora(shipped, tmp_path / "c.safetensors", mode="diff")
    assert not (tmp_path / "c.safetensors").exists()


def test_export_concept_writes_both_sdxl_files(bundle, unet_config, tmp_path):
    report, targets = export_concept(bundle, "my_xl", tmp_path, unet_config=unet_config)
    assert targets.lora.name == "my_xl.safetensors" and targets.embedding.name == "my_xl_embedding.safetensors"
    assert all(k.startswith("lora_unet_") and ("_blocks_" in k or "middle_block" in k) for k in load_file(targets.lora))
    assert sorted(load_file(targets.embedding)) == ["clip_g", "clip_l"]


def test_export_command_takes_the_unet_config_of_an_sdxl_concept(bundle, tiny_sdxl_folders, tmp_path, capsys):
    from echodistill.cli import main

    concept = bundle.save(tmp_path / "xl_concept.safetensors")
    out = ["--concept", str(concept), "--out", str(tmp_path / "loras"), "--embedding-out", str(tmp_path / "emb")]
    assert main(["export", *out]) == 2
    err = capsys.readouterr().err
    assert "pass --unet-config (the diffusers config of the UNet it was trained on)" in err and "unet_config" not in err
    assert main(["export", *out, "--unet-config", str(tmp_path / "nowhere")]) == 2
    assert "--unet-config " + str(tmp_path / "nowhere") + ": not a readable UNet config.json" in capsys.readouterr().err
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({"block_out_channels": [32, 64], "in_channels": "4"}))
    assert main(["export", *out, "--unet-config", str(edited)]) == 2  # the file named, not "the UNet config"
    assert (f'--unet-config {edited}: {edited} cannot describe a UNet (in_channels is "4", not a whole number of at '
            "least 1)") in capsys.readouterr().err
    assert not (tmp_path / "loras").exists() or not any((tmp_path / "loras").iterdir())

    _, student = tiny_sdxl_folders
    assert main(["export", *out, "--unet-config", str(student)]) == 0  # a diffusers folder: its unet/config.json
    lora = load_file(tmp_path / "loras" / "xl_concept.safetensors")
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in lora
    assert sorted(load_file(tmp_path / "emb" / "xl_concept.safetensors")) == ["clip_g", "clip_l"]


def test_a_damaged_stored_or_given_unet_config_is_refused_in_one_line(bundle, unet_config, tmp_path):
    for stored in ("x", {"sample_size": 16}):
        damaged = ConceptBundle(**{**bundle.__dict__, "unet_configs": {"student": stored}})
        with pytest.raises(ExportError, match="stored student UNet config is not the diffusers config of an SDXL UNet"):
            export_lora(damaged, tmp_path / "a.safetensors")
    inconsistent = {**unet_config, "block_out_channels": [1, 2]}
    with pytest.raises(ExportError, match="does not build a diffusers UNet"):
        export_lora(bundle, tmp_path / "a.safetensors", unet_config=inconsistent)
    assert not (tmp_path / "a.safetensors").exists()

