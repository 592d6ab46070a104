"""The node pack in-process: ComfyUI 0.3.75 importable, nodes executed directly."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import sys

import pytest
import torch
from PIL import Image

from echodistill.errors import ConfigError

import comfy_support


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_pair_folders):
    """ComfyUI's modules on sys.path (CPU), its folders pointed at a temp base, our pack loaded."""
    root = comfy_support.require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    for kind in ("checkpoints", "loras", "embeddings", "clip_vision"):
        folder_paths.add_model_folder_path(kind, str(base / kind), is_default=True)
        (base / kind).mkdir()
    folder_paths.add_model_folder_path("echodistill", str(base / "echodistill"), is_default=True)
    folder_paths.set_input_directory(str(base / "input"))
    (base / "input").mkdir()
    spec = importlib.util.spec_from_file_location("comfyui_echodistill", comfy_support.REPO / "__init__.py",
                                                  submodule_search_locations=[str(comfy_support.REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_echodistill"] = pack
    spec.loader.exec_module(pack)
    for name, folder in zip(("tiny-teacher", "tiny-student"), tiny_pair_folders):
        shutil.copytree(folder, base / "echodistill" / "diffusers" / name)
    _photos(base / "input" / "mug")
    extension = asyncio.run(pack.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    return {"base": base, "nodes": {n.define_schema().node_id: n for n in node_list}, "folder_paths": folder_paths}


def test_the_pack_file_loaded_alone_registers_nothing_and_does_not_fail():
    """pytest loads the root __init__.py as a lone file when the clone's folder name is no identifier."""
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader("comfyui-echodistill", str(comfy_support.REPO / "__init__.py"))
    spec = importlib.util.spec_from_loader("comfyui-echodistill", loader, is_package=False)
    lone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lone)
    assert not lone.__package__ and not hasattr(lone, "comfy_entrypoint")


def test_every_node_is_registered_with_tooltips(comfy):
    expected = {"EchoDistillLoadModels", "EchoDistillLoadBackbones", "EchoDistillLoadImagesFromFolder",
                "EchoDistillTrainConcept", "EchoDistillOneStepSampler", "EchoDistillTeacherSampler",
                "EchoDistillSaveConcept", "EchoDistillLoadConcept", "EchoDistillExportConcept",
                "EchoDistillEvaluateConcept"}
    assert set(comfy["nodes"]) == expected
    for node in comfy["nodes"].values():
        schema = node.define_schema()
        assert schema.category == "EchoDistill"
        for port in [*schema.inputs, *schema.outputs]:
            assert port.tooltip, f"{schema.node_id}.{port.id} has no tooltip"


def _photos(folder):
    folder.mkdir(parents=True)
    for i in range(3):
        picture = Image.new("RGB", (96, 80), (30 * i, 140, 210))
        picture.paste((240, 220, 30), (20 + 6 * i, 20, 50 + 6 * i, 50))
        picture.save(folder / f"p{i}.png")


@torch.inference_mode()  # as ComfyUI runs every node
def test_train_sample_save_load_export_in_process(comfy):
    base, nodes = comfy["base"], comfy["nodes"]

    models = nodes["EchoDistillLoadModels"].execute("diffusers/tiny-teacher", "diffusers/tiny-student", "auto", "auto",
                                                    "auto").result[0]
    images, count, captions, _ = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result
    assert images.shape == (3, 64, 64, 3) and count == 3 and captions == "\n\n"  # no sidecar captions
    train = nodes["EchoDistillTrainConcept"]
    args = dict(models=models, images=images, token="<v*>", class_word="mug", preset="paper", steps=2, resolution=64,
                lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="custom_diffusion", echo=False,
                sample_every=1, save_every=0, seed=1, resume=True, force=False)
    concept, curve, preview = train.execute(**args).result
    assert concept.step == 2 and curve.shape[-1] == 3 and preview.shape == (2, 64, 64, 3)
    again = train.execute(**args).result[0]  # same inputs: the finished run is reused, not retrained
    assert torch.equal(again.embedding, concept.embedding)
    assert torch.equal(train.execute(**args, captions=captions).result[0].embedding, concept.embedding)  # blank
    captioned = train.execute(**args, captions="a {} on a table\n\na {} outside").result[0]  # a run of its own
    assert captioned.step == 2 and not torch.equal(captioned.embedding, concept.embedding)
    with pytest.raises(ValueError, match="captions has 2 lines for 3 photos"):
        train.execute(**args, captions="a {} on a table\na {} outside")
    assert len(models.tokenizer) == 49408  # the loaded pair is untouched by training

    sampler = nodes["EchoDistillOneStepSampler"]
    with_concept = sampler.execute(models, "a photo of a <v*> mug", 3, 1, 0.0, 64, 64, 2, concept).result
    plain = sampler.execute(models, "a photo of a <v*> mug", 3, 1, 0.0, 64, 64, 2, None).result
    assert with_concept[0].shape == (2, 64, 64, 3) and with_concept[1]["samples"].shape == (2, 4, 8, 8)
    assert not torch.equal(with_concept[0], plain[0])
    teacher = nodes["EchoDistillTeacherSampler"].execute(models, "a <v*> mug", "", 0, 3, 7.5, 64, 64, 1, concept).result
    assert teacher[0].shape == (1, 64, 64, 3)

    assert nodes["EchoDistillSaveConcept"].execute(concept, "mug", False).result[0] == "mug.safetensors"
    with pytest.raises(FileExistsError, match="already exists"):
        nodes["EchoDistillSaveConcept"].execute(concept, "mug", False)
    assert nodes["EchoDistillSaveConcept"].validate_inputs(name="../mug") is not True
    loaded = nodes["EchoDistillLoadConcept"].execute("mug.safetensors").result[0]
    assert torch.equal(loaded.embedding, concept.embedding)
    lora_name, prompt_word = nodes["EchoDistillExportConcept"].execute(concept, "mug", "diff", 0, False).result
    assert (base / "loras" / lora_name).is_file() and (base / "embeddings" / "mug.safetensors").is_file()
    assert prompt_word == "embedding:mug"
    # One name rule for every node that writes: names ComfyUI's prompts cannot read back are refused, with a suggestion.
    for node in ("EchoDistillExportConcept", "EchoDistillSaveConcept"):
        for bad, good in (("my mug", "my_mug"), ("mug(v2)", "mug_v2"), ("../mug", "mug")):
            assert f"try {good!r}" in nodes[node].validate_inputs(name=bad)
    with pytest.raises(ConfigError, match="'my mug' cannot be used.*try 'my_mug'"):
        nodes["EchoDistillExportConcept"].execute(concept, "my mug", "diff", 0, True)


@torch.inference_mode()
def test_advanced_training_inputs_reach_the_config_and_zero_keeps_the_presets_value(comfy):
    nodes = comfy["nodes"]
    train = nodes["EchoDistillTrainConcept"]
    inputs = {p.id: p for p in train.define_schema().inputs}
    scale, samples = inputs["augment_min_scale"], inputs["echo_samples"]
    # optional and last, so workflows saved before they existed load with their widgets where they were
    assert [p.id for p in train.define_schema().inputs][-3:] == ["augment_min_scale", "echo_samples", "lr_token"]
    token_rate = inputs["lr_token"]
    assert token_rate.optional and (token_rate.default, token_rate.min) == (0.0, 0.0) and "0 = lr_teacher's" in (
        token_rate.tooltip)
    assert scale.optional and (scale.default, scale.min, scale.max) == (0.0, 0.0, 1.0)
    assert "fraction of the training resolution" in scale.tooltip and "0 = the preset's" in scale.tooltip
    assert samples.optional and samples.default == 0 and "0 = the preset's" in samples.tooltip

    models = nodes["EchoDistillLoadModels"].execute("diffusers/tiny-teacher", "diffusers/tiny-student", "auto", "auto",
                                                    "auto").result[0]
    images = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result[0]
    base = dict(models=models, images=images, token="<v*>", class_word="mug", preset="paper", steps=1, resolution=64,
                lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="custom_diffusion", echo=False,
                sample_every=0, save_every=0, seed=3, resume=False, force=True)
    default = train.execute(**base).result[0]
    assert default.config["augment_min_scale"] == pytest.approx(1 / 3) and default.config["echo_samples"] == 16
    assert train.execute(**{**base, "preset": "lite"}).result[0].config["echo_samples"] == 8
    bounded = train.execute(**base, augment_min_scale=0.5, echo_samples=8).result[0]
    assert bounded.config["augment_min_scale"] == 0.5 and bounded.config["echo_samples"] == 8
    with pytest.raises(ConfigError, match="augment_min_scale=1.5 must be in"):
        train.execute(**base, augment_min_scale=1.5)
    assert default.config["lr_token"] == 0.0  # the row at the teacher's rate, as the paper trains it
    assert train.execute(**base, lr_token=1e-3).result[0].config["lr_token"] == 1e-3


def test_loader_reads_sidecar_captions_one_line_per_photo(comfy):
    folder = comfy["base"] / "input" / "captioned"
    _photos(folder)
    (folder / "p0.txt").write_text("a {} on a\nwooden table\n")  # a caption's own line breaks become spaces
    (folder / "p2.txt").write_text("a {} in the snow")
    captions = comfy["nodes"]["EchoDistillLoadImagesFromFolder"].execute("captioned", 64).result[2]
    assert captions == "a {} on a wooden table\n\na {} in the snow"


def test_caption_lines_map_to_photos(comfy):
    import importlib

    photo_captions = importlib.import_module("comfyui_echodistill.nodes.training").photo_captions  # the pack's

    assert photo_captions("", 3) is None and photo_captions("\n\n", 3) is None
    assert photo_captions("a {} here\n\na {} there", 3) == ["a {} here", None, "a {} there"]
    with pytest.raises(ValueError, match="captions has 1 lines for 2 photos"):
        photo_captions("a {} here", 2)


@torch.inference_mode()
def test_backbones_feed_training_and_evaluation(comfy):
    import warnings

    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    base, nodes = comfy["base"], comfy["nodes"]
    with torch.inference_mode(False):
        torch.manual_seed(0)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                                num_attention_heads=1, image_size=32, patch_size=8,
                                                                projection_dim=16))
        vision.save_pretrained(base / "tmp_vision")
        shutil.copy(base / "tmp_vision" / "model.safetensors", base / "clip_vision" / "tiny_clip_h.safetensors")
        clip = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "vocab_size": 49408},
            vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            projection_dim=16))
        clip.save_pretrained(base / "echodistill" / "backbones" / "tiny_clip_metric")

    backbones = nodes["EchoDistillLoadBackbones"].execute("tiny_clip_h.safetensors", "none", "none", "none", True).result[0]
    assert backbones["members"] == ["teacher_features", "clip_vit_h14"]
    with pytest.raises(ValueError, match="no discriminator chosen"):
        nodes["EchoDistillLoadBackbones"].execute("none", "none", "none", "none", False)

    models = nodes["EchoDistillLoadModels"].execute("diffusers/tiny-teacher", "diffusers/tiny-student", "auto", "auto",
                                                    "fp32").result[0]
    images = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the single CLIP file's head count is guessed
        concept, curve, preview = nodes["EchoDistillTrainConcept"].execute(
            models=models, images=images, token="<v*>", class_word="mug", preset="paper", steps=1, resolution=64,
            lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="custom_diffusion", echo=False, sample_every=0,
            save_every=0, seed=2, resume=False, force=True, backbones=backbones).result
    assert concept.config["discriminators"] == ["teacher_features", "clip_vit_h14"]
    assert preview.shape == (2, 64, 64, 3)

    scores = nodes["EchoDistillEvaluateConcept"].execute(preview, images, "a photo of a <v*> mug", "<v*>", "mug",
                                                         "tiny_clip_metric", "none").result[0]
    values = json.loads(scores)
    assert set(values) == {"clip_t", "clip_i"} and 0 <= values["clip_i"] <= 1


@torch.inference_mode()
def test_shipped_mini_world_is_listed_and_loads_without_any_file_in_input(comfy):
    from echodistill.miniworld import CONCEPTS, reference_captions, reference_images

    nodes = comfy["nodes"]
    loader_inputs = {p.id: p for p in nodes["EchoDistillLoadModels"].define_schema().inputs}
    assert {"miniworld/teacher", "miniworld/student"} <= set(loader_inputs["teacher"].options)
    folder_input = next(p for p in nodes["EchoDistillLoadImagesFromFolder"].define_schema().inputs if p.id == "folder")
    assert {f"miniworld/{name}" for name in CONCEPTS} <= set(folder_input.options)
    assert "mug" in folder_input.options  # real input folders are still listed first
    images, count, captions, _ = nodes["EchoDistillLoadImagesFromFolder"].execute("miniworld/smiley", 64).result
    references = reference_images(CONCEPTS["smiley"])
    assert captions.split("\n") == reference_captions(CONCEPTS["smiley"])  # the world's grammar, "{}" for the token
    assert count == len(references) and images.shape == (len(references), 64, 64, 3)
    torch.testing.assert_close(images, torch.from_numpy(references).float() / 255, atol=1 / 255, rtol=0)
    models = nodes["EchoDistillLoadModels"].execute("miniworld/teacher", "miniworld/student", "auto", "auto",
                                                    "auto").result[0]
    assert models.student.unet.config.sample_size == 16 and models.vae_downscale == 4
    # width = height = 0: the models' native size (64 px here, where 512 px would draw noise)
    sampler = nodes["EchoDistillOneStepSampler"]
    images = sampler.execute(models, "a large red circle on the left, on a blue striped background", 0, 1, 0.0,
                             0, 0, 1, None).result[0]
    assert images.shape == (1, 64, 64, 3)
    with pytest.warns(UserWarning, match="far from the 64 x 64 these models were trained at"):
        sampler.execute(models, "a red circle", 0, 1, 0.0, 512, 512, 1, None)


@torch.inference_mode()
def test_a_fresh_procedural_subject_loads_by_name_listed_or_not(comfy):
    from echodistill.miniworld import reference_images
    from echodistill.miniworld.procedural import VALIDATION_SEEDS, procedural_subject

    loader = comfy["nodes"]["EchoDistillLoadImagesFromFolder"]
    options = next(p for p in loader.define_schema().inputs if p.id == "folder").options
    assert f"miniworld/procedural_{VALIDATION_SEEDS.start}" in options
    seed = VALIDATION_SEEDS.start + 12345  # not listed: typed by name, as in the command line
    assert loader.validate_inputs(f"miniworld/procedural_{seed}", 64) is True
    images, count, _, _ = loader.execute(f"miniworld/procedural_{seed}", 64).result
    torch.testing.assert_close(images, torch.from_numpy(reference_images(procedural_subject(seed))).float() / 255,
                               atol=1 / 255, rtol=0)


@torch.inference_mode()
def test_load_concept_refuses_a_misshapen_bundle_naming_the_file_and_the_misfit(comfy):
    """Checked as `inspect` / `sample` check it, so the error is not a bare shape error in a sampler later on."""
    import dataclasses
    from pathlib import Path

    from echodistill.concepts.bundle import ConceptBundle
    from echodistill.concepts.export import ExportError
    from echodistill.miniworld import SHIPPED_CONCEPT_DIR, STUDENT_DIR, TEACHER_DIR

    shipped = ConceptBundle.load(next(SHIPPED_CONCEPT_DIR.glob("*.safetensors")))
    configs = {part: json.loads((Path(folder) / "unet" / "config.json").read_text())
               for part, folder in (("student", STUDENT_DIR), ("teacher", TEACHER_DIR))}
    intact = dataclasses.replace(shipped, unet_configs=configs)  # as training stores them now
    key = sorted(intact.student_adapter)[0]
    narrow = dataclasses.replace(intact, student_adapter={**intact.student_adapter,
                                                          key: intact.student_adapter[key][..., :-8]})
    folder = comfy["base"] / "echodistill" / "concepts"
    folder.mkdir(parents=True, exist_ok=True)
    intact.save(folder / "intact.safetensors")
    narrow.save(folder / "narrow.safetensors")
    dataclasses.replace(intact, embedding=torch.randn(40)).save(folder / "wide_row.safetensors")
    ConceptBundle.load(folder / "narrow.safetensors")  # the unchecked load takes it: the check is what refuses it

    load = comfy["nodes"]["EchoDistillLoadConcept"]
    assert torch.equal(load.execute("intact.safetensors").result[0].embedding, intact.embedding)
    out, width = intact.student_adapter[key].shape  # a K/V ΔW reads the text states: width = the token row's
    with pytest.raises(ExportError, match=re.escape(
            f"narrow.safetensors: {key.removesuffix('.delta')}: ΔW has shape ({out}, {width - 8}) but the student "
            f"UNet it was trained on's weight is ({out}, {width}) (its config, stored in the bundle): the bundle was "
            "edited or damaged; use the bundle as training saved it")):
        load.execute("narrow.safetensors")
    with pytest.raises(ExportError, match=r"^wide_row.safetensors: the bundle's embedding row is 40 wide but the "
                                          rf"student it was trained on reads {width}-wide text states"):
        load.execute("wide_row.safetensors")


# --- SDXL: two shared text encoders through the same nodes ----------------------------------------

@pytest.fixture(scope="module")
def sdxl_checkpoints(comfy, tiny_sdxl_world):
    """The tiny SDXL pair as SGM single files in ComfyUI's checkpoints folder, their config folders beside ours."""
    from echodistill.models import tiny

    base, families, models = comfy["base"], tiny_sdxl_world["families"], tiny_sdxl_world["models"]
    names = {}
    for role, family, name in (("teacher", "tiny-sdxl", "tiny_sdxl_base.safetensors"),
                               ("student", "tiny-sdxl-turbo", "tiny_sdxl_turbo.safetensors")):
        tiny.write_single_file(models[role], base / "checkpoints" / name, families[family], "sgm", "sdxl",
                               comfy_support.SDXL_HEADERS[role])
        shutil.copytree(families[family], base / "echodistill" / "configs" / family, dirs_exist_ok=True)
        names[role] = name
    return names


@torch.inference_mode()
def test_an_sdxl_pair_trains_and_samples_through_the_nodes(comfy, sdxl_checkpoints):
    nodes = comfy["nodes"]
    loader = nodes["EchoDistillLoadModels"]
    options = {p.id: p.options for p in loader.define_schema().inputs if hasattr(p, "options")}
    assert {"sdxl-base", "sdxl-turbo"} <= set(options["teacher_family"]) == set(options["student_family"])
    assert set(sdxl_checkpoints.values()) <= set(options["teacher"])
    models = loader.execute(sdxl_checkpoints["teacher"], sdxl_checkpoints["student"], "configs/tiny-sdxl",
                            "configs/tiny-sdxl-turbo", "fp32").result[0]
    assert models.is_sdxl and len(models.text_encoders) == 2
    assert (models.teacher.family, models.student.family) == ("tiny-sdxl", "tiny-sdxl-turbo")

    images = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result[0]
    concept, curve, preview = nodes["EchoDistillTrainConcept"].execute(
        models=models, images=images, token="<v*>", class_word="mug", preset="paper", steps=2, resolution=64,
        lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="custom_diffusion", echo=False, sample_every=1,
        save_every=0, seed=3, resume=True, force=False).result
    assert concept.step == 2 and concept.is_sdxl and curve.shape[-1] == 3 and preview.shape == (2, 64, 64, 3)
    clip_l, clip_g = (e.config.hidden_size for e in models.text_encoders)
    assert concept.embedding.shape == (clip_l,) and concept.embedding_2.shape == (clip_g,)
    assert len(models.tokenizer) == len(models.tokenizer_2) == 49408  # the loaded pair is untouched by training

    sampler = nodes["EchoDistillOneStepSampler"]
    drawn, latent = sampler.execute(models, "a photo of a <v*> mug", 3, 1, 0.0, 64, 64, 2, concept).result
    plain = sampler.execute(models, "a photo of a <v*> mug", 3, 1, 0.0, 64, 64, 2, None).result[0]
    assert drawn.shape == (2, 64, 64, 3) and latent["samples"].shape == (2, 4, 8, 8)
    assert torch.isfinite(drawn).all() and not torch.equal(drawn, plain)  # the concept's two rows are read
    teacher = nodes["EchoDistillTeacherSampler"].execute(models, "a <v*> mug", "", 0, 3, 7.5, 64, 64, 1, concept)
    assert teacher.result[0].shape == (1, 64, 64, 3)

    assert nodes["EchoDistillSaveConcept"].execute(concept, "mug_xl", False).result[0] == "mug_xl.safetensors"
    loaded = nodes["EchoDistillLoadConcept"].execute("mug_xl.safetensors").result[0]
    assert loaded.is_sdxl and torch.equal(loaded.embedding_2, concept.embedding_2)
    again = sampler.execute(models, "a photo of a <v*> mug", 3, 1, 0.0, 64, 64, 2, loaded).result[0]
    torch.testing.assert_close(again, drawn)


@torch.inference_mode()
def test_concepts_and_models_of_the_two_lines_are_refused_in_one_line(comfy, sdxl_checkpoints):
    from echodistill.concepts.bundle import BundleMismatchError
    from echodistill.errors import IncompatiblePairError

    nodes = comfy["nodes"]
    loader = nodes["EchoDistillLoadModels"]
    with pytest.raises(IncompatiblePairError, match="cannot share a text encoder.*pair SDXL base with SDXL-Turbo"):
        loader.execute(sdxl_checkpoints["teacher"], "diffusers/tiny-student", "configs/tiny-sdxl", "auto", "fp32")
    sdxl = loader.execute(sdxl_checkpoints["teacher"], sdxl_checkpoints["student"], "configs/tiny-sdxl",
                          "configs/tiny-sdxl-turbo", "fp32").result[0]
    sd2 = loader.execute("diffusers/tiny-teacher", "diffusers/tiny-student", "auto", "auto", "fp32").result[0]
    images = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result[0]
    sd2_concept = nodes["EchoDistillTrainConcept"].execute(
        models=sd2, images=images, token="<v*>", class_word="mug", preset="paper", steps=1, resolution=64,
        lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="custom_diffusion", echo=False, sample_every=0,
        save_every=0, seed=4, resume=False, force=True).result[0]
    with pytest.raises(BundleMismatchError, match="load the same base models it was trained with"):
        nodes["EchoDistillOneStepSampler"].execute(sdxl, "a <v*> mug", 0, 1, 0.0, 64, 64, 1, sd2_concept)


@torch.inference_mode()
def test_the_adapter_input_preset_follows_the_preset_of_the_models_line(comfy, sdxl_checkpoints):
    nodes = comfy["nodes"]
    loader, train = nodes["EchoDistillLoadModels"], nodes["EchoDistillTrainConcept"]
    sdxl = loader.execute(sdxl_checkpoints["teacher"], sdxl_checkpoints["student"], "configs/tiny-sdxl",
                          "configs/tiny-sdxl-turbo", "fp32").result[0]
    sd2 = loader.execute("diffusers/tiny-teacher", "diffusers/tiny-student", "auto", "auto", "fp32").result[0]
    images = nodes["EchoDistillLoadImagesFromFolder"].execute("mug", 64).result[0]
    args = dict(images=images, token="<v*>", class_word="mug", preset="lite", steps=1, resolution=64,
                lr_student=2e-5, lr_teacher=1e-5, lr_heads=1e-4, adapter="preset", echo=False, sample_every=0,
                save_every=0, seed=5, resume=False, force=True)
    assert train.execute(models=sdxl, **args).result[0].adapter == "lora"  # SDXL's lite: LoRA K/V, to fit 24 GB
    assert train.execute(models=sd2, **args).result[0].adapter == "custom_diffusion"
    chosen = train.execute(models=sdxl, **{**args, "adapter": "custom_diffusion"}).result[0]
    assert chosen.adapter == "custom_diffusion"  # a choice made in the node wins over the preset's
