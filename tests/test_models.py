"""Offline loading of a teacher/student pair through one shared text encoder."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from echodistill.errors import IncompatiblePairError, ModelLoadError
from echodistill.models import checkpoint_layout as layout_map
from echodistill.models import tiny as tiny_models
from echodistill.models.families import CONFIG_ROOT, FAMILIES, SDXL_FAMILIES, detect_family, family_config
from echodistill.models.loading import ModelSource, load_text_encoder, load_unet
from echodistill.models.pair import SharedEncoderWarning, load_model_pair
from echodistill.models.tensor_files import TensorFile


def _assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    got = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
    want = {k.removeprefix("text_model."): v for k, v in reference.state_dict().items()}
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _single_files(tiny_world, tmp_path, layout):
    fam, models = tiny_world["families"], tiny_world["models"]
    teacher = tiny_models.write_single_file(
        models["teacher"], tmp_path / "teacher.safetensors", fam["tiny-sd21"], layout, "openclip"
    )
    student = tiny_models.write_single_file(
        models["student"], tmp_path / "student.safetensors", fam["tiny-turbo"], layout, "openclip"
    )
    return teacher, student


@pytest.mark.parametrize("fmt", ["diffusers", "ldm", "sgm"])
def test_every_tensor_round_trips(fmt, tiny_world, tiny_pair_folders, tmp_path):
    fam, models = tiny_world["families"], tiny_world["models"]
    if fmt == "diffusers":
        teacher, student = tiny_pair_folders
        kwargs = {}
    else:
        teacher, student = _single_files(tiny_world, tmp_path, fmt)
        kwargs = {"teacher_family": fam["tiny-sd21"], "student_family": fam["tiny-turbo"]}
    pair = load_model_pair(teacher, student, **kwargs)

    _assert_same_weights(pair.teacher.unet, models["teacher"]["unet"])
    _assert_same_weights(pair.student.unet, models["student"]["unet"])
    _assert_same_weights(pair.text_encoder, models["teacher"]["text_encoder"])
    _assert_same_weights(pair.vae, models["student"]["vae"])
    ids = pair.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = models["teacher"]["text_encoder"](ids).last_hidden_state
        assert torch.allclose(pair.text_encoder(ids).last_hidden_state, expected)
    assert not any(p.requires_grad for p in pair.teacher.unet.parameters())


def test_same_weights_same_fingerprints_across_formats(tiny_world, tiny_pair_folders, tmp_path):
    fam = tiny_world["families"]
    from_folders = load_model_pair(*tiny_pair_folders)
    teacher, student = _single_files(tiny_world, tmp_path, "sgm")
    from_files = load_model_pair(
        teacher, student, teacher_family=fam["tiny-sd21"], student_family=fam["tiny-turbo"], dtype="fp16"
    )
    assert from_folders.fingerprints() == from_files.fingerprints()
    assert from_folders.teacher.fingerprint != from_folders.student.fingerprint


def test_student_text_tower_is_never_loaded(tiny_world, tmp_path, monkeypatch):
    fam = tiny_world["families"]
    teacher, student = _single_files(tiny_world, tmp_path, "sgm")
    read: list[tuple[str, str]] = []
    original_get = TensorFile.get

    def spy(self, key):
        read.append((self.path.name, key))
        return original_get(self, key)

    monkeypatch.setattr(TensorFile, "get", spy)
    load_model_pair(teacher, student, teacher_family=fam["tiny-sd21"], student_family=fam["tiny-turbo"])
    prefix = layout_map.TEXT_PREFIXES[("sgm", "openclip")]
    student_text = [k for name, k in read if name == "student.safetensors" and k.startswith(prefix)]
    # Only the tensors of the fingerprint (a few rows, two norms) are read from the student's tower.
    assert all("transformer.resblocks" not in k for k in student_text), student_text
    teacher_text = {k for name, k in read if name == "teacher.safetensors" and k.startswith(prefix)}
    assert f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in teacher_text
    assert f"{prefix}transformer.resblocks.2.attn.in_proj_weight" not in teacher_text  # the dropped 24th-layer analogue


def test_loading_makes_no_network_calls(tiny_world, tmp_path, network_attempts):
    fam = tiny_world["families"]
    teacher, student = _single_files(tiny_world, tmp_path, "sgm")
    pair = load_model_pair(teacher, student, teacher_family=fam["tiny-sd21"], student_family=fam["tiny-turbo"])
    assert pair.student.prediction_type == "epsilon"
    assert network_attempts == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_is_the_callers(dtype, tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders, dtype=dtype)
    for module in (pair.teacher.unet, pair.student.unet, pair.vae, pair.text_encoder):
        assert {p.dtype for p in module.parameters()} == {dtype}
    assert pair.fingerprints() == load_model_pair(*tiny_pair_folders).fingerprints()
    assert pair.text_encoder.device.type == "cpu"


def test_unknown_dtype_is_rejected(tiny_pair_folders):
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'.*fp32, fp16, bf16"):
        load_model_pair(*tiny_pair_folders, dtype="fp8")


def test_sd15_teacher_with_turbo_student_is_refused(tiny_world, tmp_path):
    fam = tiny_world["families"]
    sd15 = tiny_models.build_models(fam["tiny-sd15"], seed=3)
    teacher = tiny_models.write_single_file(sd15, tmp_path / "sd15.safetensors", fam["tiny-sd15"], "ldm", "clip")
    _, student = _single_files(tiny_world, tmp_path, "sgm")
    with pytest.raises(
        IncompatiblePairError, match=r"teacher sd15\.safetensors \(tiny-sd15\).*student.*\(tiny-turbo\)"
    ):
        load_model_pair(teacher, student, teacher_family=fam["tiny-sd15"], student_family=fam["tiny-turbo"])


def test_different_text_weights_warn_with_both_fingerprints(tiny_world, tmp_path):
    fam, models = tiny_world["families"], tiny_world["models"]
    other = tiny_models.build_models(fam["tiny-turbo"], seed=7)
    other["vae"] = models["student"]["vae"]
    teacher, _ = _single_files(tiny_world, tmp_path, "ldm")
    student = tiny_models.write_single_file(other, tmp_path / "other.safetensors", fam["tiny-turbo"], "sgm", "openclip")
    with pytest.warns(
        SharedEncoderWarning,
        match=r"text encoders share the architecture but not the weights \(teacher [0-9a-f]{12}, student [0-9a-f]{12}\)",
    ):
        pair = load_model_pair(teacher, student, teacher_family=fam["tiny-sd21"], student_family=fam["tiny-turbo"])
    _assert_same_weights(pair.text_encoder, models["teacher"]["text_encoder"])


def test_identical_text_weights_do_not_warn(tiny_pair_folders):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedEncoderWarning)
        load_model_pair(*tiny_pair_folders)


def test_wrong_family_for_a_file_says_so(tiny_world, tmp_path):
    teacher, student = _single_files(tiny_world, tmp_path, "sgm")
    with pytest.raises(ModelLoadError, match="teacher.safetensors lacks [0-9]+ tensors its family's config expects "
                       r"\([0-9]+ of the (text encoder|UNet).*or pick the family it was made for"):
        load_model_pair(teacher, student, teacher_family="sd21-base", student_family="sd-turbo")
    fam = tiny_world["families"]
    with pytest.raises(ModelLoadError, match="shape .* in the file but .* in the config. Pick the right family"):
        load_unet(ModelSource.open(teacher, fam["tiny-sd15"]))



def test_a_diffusers_folder_whose_config_misfits_its_weights_is_named_as_such(tiny_pair_folders, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]  # another model's config
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_unet(ModelSource.open(folder))
    message = str(info.value)
    assert "in the file but" in message and "unet/config.json does not describe its weights" in message, message
    assert "family" not in message  # a folder's configs are its own: no family would fit it
    config["block_out_channels"] = [32]  # whole numbers, but one block for four: no UNet builds, no traceback
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="UNet of teacher: its config cannot build the model"):
        load_unet(ModelSource.open(folder))


@pytest.mark.parametrize("edit, problem", [
    ({"in_channels": "4"}, 'in_channels is "4", not a whole number of at least 1'),
    ({"layers_per_block": 2.0}, "layers_per_block is 2.0, not a whole number of at least 1"),
    ({"block_out_channels": ["32", "32", "64", "64"]},
     'block_out_channels is ["32", "32", "64", "64"], not whole numbers of at least 1'),
    ({"cross_attention_dim": "32", "sample_size": True},
     'sample_size is true, not a whole number of at least 1; cross_attention_dim is "32", not a whole number')])
def test_a_unet_config_with_text_or_fractions_for_sizes_names_the_file_and_the_key(tiny_pair_folders, tmp_path, edit,
                                                                                  problem, capsys):
    """diffusers checks no types: "4" failed deep in torch as "not all arguments converted during string formatting"."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    config_path = teacher / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(ModelLoadError) as info:
        load_model_pair(teacher, tiny_pair_folders[1])
    message = str(info.value)
    assert message.startswith(f"{config_path} cannot describe a UNet: {problem}") and message.endswith(
        ". Write whole numbers there (without quotes), or restore the file from the model's release."), message
    from echodistill.cli import main

    assert main(["inspect", str(teacher)]) == 2  # the config is checked where it is parsed: no --load needed
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_folder_read_with_a_named_family_is_advised_to_use_its_own_configs(tiny_pair_folders, tiny_world,
                                                                              capsys):
    fam = tiny_world["families"]
    with pytest.raises(ModelLoadError) as info:
        load_unet(ModelSource.open(tiny_pair_folders[0], fam["tiny-sd15"]))
    message = str(info.value)
    assert "read with family tiny-sd15's configs, as named, not its own: leave the family on auto" in message, message
    assert "restore the folder" not in message  # the folder is fine
    from echodistill.cli import main

    assert main(["inspect", str(tiny_pair_folders[0]), "--family", str(fam["tiny-sd15"])]) == 0
    assert capsys.readouterr().out.startswith("teacher: a diffusers folder, read with family tiny-sd15's configs as "
                                              "named (leave --family on auto to read it with its own)")


def test_a_text_encoder_pickled_under_transformers_name_loads_as_its_safetensors_twin(tiny_pair_folders, tmp_path):
    from safetensors.torch import load_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    stored = teacher / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(stored)), teacher / "text_encoder" / "pytorch_model.bin")  # as older releases ship it
    stored.unlink()
    pickled, original = load_model_pair(teacher, tiny_pair_folders[1]), load_model_pair(*tiny_pair_folders)
    assert pickled.text_fingerprint == original.text_fingerprint
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    assert torch.equal(pickled.text_encoder(ids).last_hidden_state, original.text_encoder(ids).last_hidden_state)


@pytest.mark.parametrize("edit", [{"hidden_size": 64}, {"num_hidden_layers": 7}])
def test_a_text_encoder_config_edited_in_one_folder_is_named_not_blamed_on_the_pair(tiny_pair_folders, tmp_path, edit,
                                                                                     capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    config_path = teacher / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    wrong = ", ".join(f"{k} {v} (the weights: {config[k]})" for k, v in edit.items())
    config_path.write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelLoadError) as info:
        load_model_pair(teacher, tiny_pair_folders[1])
    message = str(info.value)
    assert message == (f"{config_path} does not describe the weights beside it: it gives {wrong}. Restore the file "
                       "from the model's release."), message
    assert ModelSource.open(tiny_pair_folders[0]).text_config_misfit() is None  # the intact folder
    from echodistill.cli import main

    assert main(["inspect", str(teacher)]) == 2  # inspect reads the headers too, without --load
    assert capsys.readouterr().err == f"error: {message}\n"
    assert main(["inspect", str(tiny_pair_folders[0])]) == 0


@pytest.mark.parametrize("edit, problem", [
    ({"num_attention_heads": -2}, "num_attention_heads is -2, not a whole number of at least 1"),  # torch builds it
    ({"hidden_act": "swish9"}, 'hidden_act "swish9" is no activation transformers has'),
    ({"hidden_size": "32"}, 'hidden_size is "32", not a whole number of at least 1'),
    ({"intermediate_size": 7}, "intermediate_size 7 (the weights: 64)"),
    ({"max_position_embeddings": 50}, "max_position_embeddings 50 (the weights: 77)")])
def test_text_encoder_configs_no_encoder_or_not_these_weights_are_refused_by_inspect_and_load(
        tiny_pair_folders, tmp_path, edit, problem, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    config_path = teacher / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    from echodistill.cli import main

    assert main(["inspect", str(teacher)]) == 2  # no --load: the config and the weights' headers are read
    assert problem in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match=re.escape(problem)):
        load_model_pair(teacher, teacher)  # the same folder twice: only the file's own fault can stop it


@pytest.mark.parametrize("edit", [{"num_attention_heads": 5}, {"vocab_size": "big"}])
def test_a_text_encoder_config_no_model_can_be_built_from_is_one_load_error(tiny_pair_folders, tmp_path, edit):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    config_path = teacher / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(ModelLoadError, match=r"^text encoder of teacher: its config cannot build the model \(.+\)\. "
                                             r"The folder's text_encoder/config.json does not describe its weights"):
        load_text_encoder(ModelSource.open(teacher))


def test_missing_model_and_unknown_family_errors(tiny_pair_folders, tmp_path):
    teacher, student = tiny_pair_folders
    with pytest.raises(ModelLoadError, match="model not found: .*nope.safetensors"):
        load_model_pair(tmp_path / "nope.safetensors", student)
    with pytest.raises(ModelLoadError, match="unknown model family 'sdxl': use one of sd-turbo, sd21-base"):
        load_model_pair(teacher, student, teacher_family="sdxl")
    not_sd = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_sd))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_model_pair(not_sd, student)


# --- family detection ----------------------------------------------------------------------------


def _detect(tiny_world, tmp_path, layout, text_kind, role, family="tiny-sd21", metadata=None, with_text=True):
    models = tiny_world["models"]["teacher"]
    fam = tiny_world["families"][family]
    if family == "tiny-sd15":
        models = tiny_models.build_models(fam, seed=3)
    path = tiny_models.write_single_file(
        models, tmp_path / "m.safetensors", fam, layout, text_kind, metadata, with_text
    )
    return detect_family(TensorFile(path), role)


def test_detection_of_sd2_files_by_role_and_header(tiny_world, tmp_path):
    sgm_student = _detect(tiny_world, tmp_path, "sgm", "openclip", "student")
    assert (sgm_student.family, sgm_student.layout) == ("sd-turbo", "sgm")
    ldm_teacher = _detect(tiny_world, tmp_path, "ldm", "openclip", "teacher")
    assert (ldm_teacher.family, ldm_teacher.layout) == ("sd21-base", "ldm")
    assert "sd21-768v" in ldm_teacher.reason  # the user is told how to override
    v_teacher = _detect(
        tiny_world,
        tmp_path,
        "ldm",
        "openclip",
        "teacher",
        metadata={"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.prediction_type": "v"},
    )
    assert v_teacher.family == "sd21-768v"
    assert family_config(v_teacher.family).prediction_type == "v_prediction"


def test_detection_of_sd15_and_textless_files(tiny_world, tmp_path):
    sd15 = _detect(tiny_world, tmp_path, "ldm", "clip", "teacher", family="tiny-sd15")
    assert (sd15.family, sd15.text_kind) == ("sd15", "clip")
    with pytest.raises(ModelLoadError, match="no text tower and a 32-wide cross-attention, which no shipped"):
        _detect(tiny_world, tmp_path, "ldm", "openclip", "teacher", with_text=False)


def test_prediction_types_come_from_the_shipped_configs():
    assert family_config("sd21-768v").prediction_type == "v_prediction"
    assert family_config("sd21-base").prediction_type == "epsilon"
    turbo = family_config("sd-turbo")
    assert turbo.prediction_type == "epsilon"
    assert turbo.scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert turbo.scheduler["timestep_spacing"] == "trailing"
    assert family_config("sd15").tokenizer_style == "sd1"


def test_explicit_family_overrides_detection(tiny_world, tmp_path):
    teacher, student = _single_files(tiny_world, tmp_path, "ldm")
    fam = tiny_world["families"]
    source = ModelSource.open(teacher, fam["tiny-sd21v"], role="teacher")
    assert source.config.prediction_type == "v_prediction"
    assert source.reason == "family given by the caller"


# --- the shipped full-size configs ---------------------------------------------------------------

KNOWN_PARAMETER_COUNTS = {  # published sizes of the real networks
    ("sd21-base", "unet"): 865_910_724,
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(SDXL_FAMILIES)))  # SDXL: tests/test_sdxl_models.py
def test_shipped_configs_build_the_real_architectures(family):
    config = family_config(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config.unet)
        vae = AutoencoderKL.from_config(config.vae)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.text_encoder.items() if not k.startswith("_")}))
    counts = {"unet": unet.num_parameters(), "vae": vae.num_parameters(), "text_encoder": text.num_parameters()}
    for (name, part), expected in KNOWN_PARAMETER_COUNTS.items():
        if name == family or (name == "sd21-base" and family in ("sd-turbo", "sd21-768v")):
            assert counts[part] == expected, (family, part)
    # Every parameter of the full-size networks has a place in the single-file layouts.
    text_kind = "clip" if family == "sd15" else "openclip"
    unet_map = layout_map.unet_sources(unet.state_dict(), config.unet)
    vae_map = layout_map.vae_sources(vae.state_dict(), config.vae)
    text_keys = [k for k in text.state_dict() if not k.endswith("position_ids")]
    text_map = layout_map.text_sources(text_keys, "ldm", text_kind)
    assert len({s.key for s in unet_map.values()}) == len(unet_map)
    file_keys = {s.key for m in (unet_map, vae_map, text_map) for s in m.values()}
    assert not any(k.endswith(".") for k in file_keys)
    known = [  # names as they appear in the published single-file checkpoints
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.norm_out.bias",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
    ]
    known += (
        ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
        if family == "sd15"
        else ["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", "cond_stage_model.model.ln_final.bias"]
    )
    assert set(known) <= file_keys, sorted(set(known) - file_keys)
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias" in {
        s.key for s in unet_map.values()
    }
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in {s.key for s in vae_map.values()}
    assert len(text_map) == len(text_keys)


def test_shipped_config_folders_are_complete():
    for family in FAMILIES:
        for part in (
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
        ):
            assert (CONFIG_ROOT / family / part).is_file(), (family, part)
