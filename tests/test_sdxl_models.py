"""SDXL as a family: shipped configs, the SGM single-file layout (read and written), detection, the two
shared text encoders, the conditioning they make, and the refusal of mixed SD 2.x / SDXL pairs."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from echodistill.errors import IncompatiblePairError, ModelLoadError
from echodistill.models import checkpoint_layout as layout_map
from echodistill.models import loading
from echodistill.models import tiny
from echodistill.models.concept import add_concept_tokens, concept_embedding
from echodistill.models.conditioning import Conditioning, size_time_ids
from echodistill.models.families import SDXL_FAMILIES, detect_family, family_config
from echodistill.models.pair import load_model_pair
from echodistill.models.tensor_files import TensorFile

SDXL_BASE_HEADER = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "SDXL 1.0 base"}
SDXL_TURBO_HEADER = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "SDXL Turbo"}


@pytest.fixture(scope="module")
def pair(tiny_sdxl_folders):
    return load_model_pair(*tiny_sdxl_folders)


@pytest.fixture(scope="module")
def single_files(tiny_sdxl_world, tmp_path_factory):
    root, fam, models = tmp_path_factory.mktemp("sdxl_files"), tiny_sdxl_world["families"], tiny_sdxl_world["models"]
    teacher = tiny.write_single_file(models["teacher"], root / "base.safetensors", fam["tiny-sdxl"], "sgm", "sdxl",
                                     SDXL_BASE_HEADER)
    student = tiny.write_single_file(models["student"], root / "turbo.safetensors", fam["tiny-sdxl-turbo"], "sgm",
                                     "sdxl", SDXL_TURBO_HEADER)
    return teacher, student


# --- shipped configs and the single-file key names ------------------------------------------------

@pytest.mark.parametrize("family", SDXL_FAMILIES)
def test_shipped_sdxl_configs_build_the_published_networks_and_every_key_has_its_sgm_name(family):
    config = family_config(family)
    assert config.is_sdxl and config.text_components == ("text_encoder", "text_encoder_2")
    assert config.context_width == config.unet["cross_attention_dim"] == 2048
    assert config.vae["scaling_factor"] == 0.13025 and config.prediction_type == "epsilon"
    spacing = {"sdxl-base": "leading", "sdxl-turbo": "trailing"}[family]
    assert config.scheduler["timestep_spacing"] == spacing and config.scheduler["steps_offset"] == 1
    assert [config.tokenizer_style_of(c) for c in config.text_components] == ["sd1", "sd2"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config.unet)
        vae = AutoencoderKL.from_config(config.vae)
        clip_l = CLIPTextModel(CLIPTextConfig(**config.text_config("text_encoder")))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config("text_encoder_2")))
    # Published parameter counts of SDXL base 1.0's networks.
    assert (unet.num_parameters(), clip_l.num_parameters(), clip_g.num_parameters()) == (
        2_567_463_684, 123_060_480, 694_659_840)
    assert vae.num_parameters() == 83_653_863
    keys = set()
    for sources in (
        layout_map.unet_sources(unet.state_dict(), config.unet),
        layout_map.vae_sources(vae.state_dict(), config.vae),
        layout_map.text_sources([k for k in clip_l.state_dict() if not k.endswith("position_ids")], "sgm", "sdxl"),
        layout_map.text_sources([k for k in clip_g.state_dict() if not k.endswith("position_ids")], "sgm", "sdxl",
                                "text_encoder_2"),
    ):
        keys |= {s.key for s in sources.values()}
    known = [  # key names of Stability AI's sd_xl_base_1.0 / sd_xl_turbo_1.0 files
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.ln_final.bias",
        "conditioner.embedders.1.model.text_projection",
    ]
    assert set(known) <= keys, sorted(set(known) - keys)
    assert not any("output_blocks.8.1." in k or "input_blocks.1.1." in k for k in keys)  # no attention at level 0


def test_text_projection_is_stored_transposed_as_open_clip_saves_it(tiny_sdxl_world, single_files):
    weight = tiny_sdxl_world["models"]["teacher"]["text_encoder_2"].text_projection.weight  # (out, in)
    with safe_open(str(single_files[0]), "pt") as handle:
        stored = handle.get_tensor("conditioner.embedders.1.model.text_projection")  # (in, out)
        fused = handle.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    assert torch.equal(stored, weight.t())
    q = tiny_sdxl_world["models"]["teacher"]["text_encoder_2"].text_model.encoder.layers[0].self_attn.q_proj.weight
    assert fused.shape[0] == 3 * q.shape[0] and torch.equal(fused[: q.shape[0]], q)


# --- detection ---------------------------------------------------------------------------------------

def test_sdxl_single_files_are_detected_from_keys_and_header(single_files, tiny_sdxl_world, tmp_path):
    teacher, student = (TensorFile(p) for p in single_files)
    assert detect_family(teacher, "teacher").family == "sdxl-base"
    assert detect_family(student, "student").family == "sdxl-turbo"
    assert detect_family(student, "teacher").family == "sdxl-turbo"  # the header names it, whatever the role
    detection = detect_family(teacher, "student")
    assert (detection.family, detection.layout, detection.text_kind) == ("sdxl-base", "sgm", "sdxl")
    bare = tiny.write_single_file(tiny_sdxl_world["models"]["student"], tmp_path / "bare.safetensors",
                                  tiny_sdxl_world["families"]["tiny-sdxl-turbo"], "sgm", "sdxl")
    assert detect_family(TensorFile(bare), "student").family == "sdxl-turbo"  # no header: by role
    assert detect_family(TensorFile(bare), "teacher").family == "sdxl-base"


def test_single_files_load_to_the_same_weights_as_diffusers_folders(single_files, tiny_sdxl_world, pair):
    fam = tiny_sdxl_world["families"]
    from_files = load_model_pair(*single_files, teacher_family=fam["tiny-sdxl"], student_family=fam["tiny-sdxl-turbo"])
    assert from_files.fingerprints() == pair.fingerprints()
    for a, b in ((from_files.text_encoder_2, pair.text_encoder_2), (from_files.student.unet, pair.student.unet),
                 (from_files.text_encoder, pair.text_encoder), (from_files.vae, pair.vae)):
        theirs = b.state_dict()
        for key, value in a.state_dict().items():
            assert torch.equal(value, theirs[key]), key


def test_a_tiny_sdxl_file_named_as_an_sd2_family_is_refused(single_files):
    with pytest.raises(Exception, match="is an SDXL checkpoint .*name one of sdxl-base or sdxl-turbo"):
        loading.ModelSource.open(single_files[0], "sd-turbo", role="student")


@pytest.mark.parametrize(("dropped", "message"), [
    ("conditioner.embedders.1.", "a partial SDXL checkpoint: it holds the CLIP ViT-L text encoder "
                                 r"\(conditioner.embedders.0.transformer.text_model.\*\) but not the OpenCLIP ViT-bigG"),
    ("conditioner.embedders.0.", "a partial SDXL checkpoint: it holds the OpenCLIP ViT-bigG text encoder .* but not "
                                 "the CLIP ViT-L"),
    ("conditioner.", r"has no text encoder \(a UNet-only file\?\).*whole checkpoint"),
    ("model.diffusion_model.output_blocks.", r"lacks [0-9]+ tensors its family's config expects \([0-9]+ of the UNet; "
                                             "e.g. model.diffusion_model.output_blocks"),
])
def test_a_partial_sdxl_file_is_refused_naming_the_part_it_lacks(single_files, tiny_sdxl_world, tmp_path, dropped,
                                                                   message):
    from safetensors.torch import load_file, save_file

    fam = tiny_sdxl_world["families"]
    kept = {k: v for k, v in load_file(single_files[0]).items() if not k.startswith(dropped)}
    partial = tmp_path / "partial.safetensors"
    save_file(kept, str(partial))
    with pytest.raises(ModelLoadError, match=message):
        load_model_pair(partial, single_files[1], teacher_family=fam["tiny-sdxl"], student_family=fam["tiny-sdxl-turbo"])


# --- two shared text encoders --------------------------------------------------------------------------

def test_only_the_teachers_two_text_encoders_are_loaded_and_serve_both(tiny_sdxl_folders, monkeypatch):
    calls = []
    original = loading.load_text_encoder

    def counting(source, dtype=torch.float32, device="cpu", component="text_encoder"):
        calls.append((source.path.name, component))
        return original(source, dtype, device, component)

    monkeypatch.setattr("echodistill.models.pair.load_text_encoder", counting)
    pair = load_model_pair(*tiny_sdxl_folders)
    assert calls == [("teacher", "text_encoder"), ("teacher", "text_encoder_2")]  # never the student's
    assert isinstance(pair.text_encoder_2, CLIPTextModelWithProjection)
    conditioner = pair.conditioner
    assert conditioner.text_encoders[0] is pair.text_encoder and conditioner.text_encoders[1] is pair.text_encoder_2
    assert conditioner.tokenizers == (pair.tokenizer, pair.tokenizer_2)
    # SDXL's tokenizers pad as published: CLIP ViT-L with <|endoftext|>, OpenCLIP bigG with "!".
    assert (pair.tokenizer.pad_token, pair.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert set(pair.fingerprints()) >= {"text_encoder", "text_encoder_2"}


def test_conditioning_is_both_penultimate_states_pooled_projection_and_size_ids(pair):
    prompts = ["a photo of a dog", "a red car"]
    with torch.no_grad():
        cond = pair.conditioner.encode(prompts, size=(64, 96))
        ids_l = pair.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids_g = pair.tokenizer_2(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out_l = pair.text_encoder(ids_l, output_hidden_states=True)
        out_g = pair.text_encoder_2(ids_g, output_hidden_states=True)
    assert cond.shape == (2, 77, 24 + 32) and cond.text_embeds.shape == (2, 32)
    assert torch.equal(cond.encoder_hidden_states, torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1))
    assert torch.equal(cond.text_embeds, out_g.text_embeds)
    assert cond.time_ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2  # (original h, w, crop top, left, target h, w)
    assert torch.equal(size_time_ids((64, 96), 2), cond.time_ids)
    kwargs = cond.unet_kwargs(torch.float32)
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    # Tensor-like handling keeps the three parts in step.
    both = Conditioning.cat([cond[:1], cond[1:]])
    assert torch.equal(both.encoder_hidden_states, cond.encoder_hidden_states) and len(cond.expand(2)[:1]) == 1
    empty = pair.conditioner.negative("", size=(64, 96))  # SDXL: zeros for "", the size ids kept
    assert not empty.encoder_hidden_states.any() and not empty.text_embeds.any() and empty.time_ids.any()
    with pytest.raises(Exception, match="needs the image size"):
        pair.conditioner.encode(prompts)


def test_the_token_gets_one_row_in_each_encoder_and_pooling_stays_at_the_end_token(tiny_sdxl_folders):
    pair = load_model_pair(*tiny_sdxl_folders)
    tables = [e.get_input_embeddings().weight.detach().clone() for e in pair.text_encoders]
    dog = [t("dog", add_special_tokens=False).input_ids for t in pair.tokenizers]
    tokens = add_concept_tokens(pair.tokenizers, pair.text_encoders, "<sks>", "dog")
    assert [t.token_id for t in tokens] == [49408, 49408]
    rows = [concept_embedding(e).concept_row for e in pair.text_encoders]
    assert [tuple(r.shape) for r in rows] == [(24,), (32,)]
    for row, table, ids in zip(rows, tables, dog):
        assert torch.allclose(row, table[ids].float().mean(0))
    # The frozen tables are the loaded ones (same storage): no copy of an encoder was made.
    for encoder, table in zip(pair.text_encoders, tables):
        assert torch.equal(concept_embedding(encoder).table.weight[:49408], table)
    # Pooling reads the end token, not the concept token (whose id 49408 is now the highest).
    with torch.no_grad():
        cond = pair.conditioner.encode(["a <sks> dog"], size=(64, 64))
        ids = pair.tokenizer_2(["a <sks> dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = pair.text_encoder_2(ids)
        eos = int((ids[0] == 49407).nonzero()[0])
        expected = pair.text_encoder_2.text_projection(out.last_hidden_state[0, eos])
    assert torch.allclose(cond.text_embeds[0], expected, atol=1e-6)
    with pytest.raises(Exception, match="already exists"):
        add_concept_tokens(pair.tokenizers, pair.text_encoders, "<sks>", "dog")


# --- mixed pairs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["sd2_teacher", "sdxl_teacher"])
def test_sd2_and_sdxl_cannot_share_a_text_encoder(order, tiny_pair_folders, tiny_sdxl_folders):
    teacher, student = (tiny_pair_folders[0], tiny_sdxl_folders[1]) if order == "sd2_teacher" else (
        tiny_sdxl_folders[0], tiny_pair_folders[1])
    with pytest.raises(IncompatiblePairError) as caught:
        load_model_pair(teacher, student)
    message = str(caught.value)
    assert "\n" not in message and "cannot share a text encoder" in message
    assert f"({teacher.name})" in message and f"({student.name})" in message  # both families named
    assert "pair SDXL base with SDXL-Turbo, or SD 2.1 with SD-Turbo" in message
