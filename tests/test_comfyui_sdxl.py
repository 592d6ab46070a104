"""Proof in a real ComfyUI that our SDXL exports reproduce our one-step SDXL student there.

Core nodes only, on a mini SDXL single file that ComfyUI's own loader detects as SDXL:
CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode("embedding:NAME") -> SDTurboScheduler +
KSamplerSelect(euler) -> SamplerCustom (cfg 1) -> SaveLatent / VAEDecode. Run with `-s` to see the
measured errors.
"""

from __future__ import annotations

import importlib
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import comfy_support
from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import export_embedding, export_lora
from echodistill.models.adapters import adapter_state_dict, add_custom_diffusion
from echodistill.models.concept import add_concept_tokens, set_concept_rows
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import sample_student

SEED = 7
PROMPT = "a photo of {} toy"
CHECKPOINT = "mini_sdxl.ckpt"
EMBEDDING = "echo_xl_concept"
SCALING = 0.13025  # SDXL's VAE scaling factor: ComfyUI's SaveLatent stores raw VAE latents


@pytest.fixture(scope="module")
def mini_sdxl(comfy_models, tmp_path_factory):
    family = comfy_support.write_mini_sdxl_family(tmp_path_factory.mktemp("mini_sdxl") / "family")
    checkpoint = comfy_support.write_mini_sdxl_checkpoint(comfy_models["checkpoints"] / CHECKPOINT, family)
    return {"checkpoint": checkpoint, "family": family}


@pytest.fixture(scope="module")
def concept(mini_sdxl, comfy_models):
    """Distinctive token rows in both text encoders and random student K/V deltas, exported twice."""
    pair = load_model_pair(mini_sdxl["checkpoint"], mini_sdxl["checkpoint"], teacher_family=mini_sdxl["family"],
                           student_family=mini_sdxl["family"])
    add_concept_tokens(pair.tokenizers, pair.text_encoders, "<v*>", "toy")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(768, generator=generator) * 0.5, torch.randn(1280, generator=generator) * 0.5]
    set_concept_rows(pair.text_encoders, rows)
    add_custom_diffusion(pair.student.unet)
    with torch.no_grad():
        for name, param in pair.student.unet.named_parameters():
            if name.endswith(".delta"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    bundle = ConceptBundle(
        token="<v*>", initializer="toy", class_word="toy", embedding=rows[0], embedding_2=rows[1],
        adapter="custom_diffusion", student_adapter=adapter_state_dict(pair.student.unet), teacher_adapter={},
        fingerprints=pair.fingerprints(), families={"teacher": "mini-sdxl", "student": "mini-sdxl"},
    )
    unet_config = comfy_support.MINI_SDXL_UNET
    exports = {mode: export_lora(bundle, comfy_models["loras"] / f"echo_xl_{mode}.safetensors", mode=mode,
                                 unet_config=unet_config) for mode in ("diff", "lowrank")}
    export_embedding(bundle, comfy_models["embeddings"] / f"{EMBEDDING}.safetensors")
    ours = sample_student(pair, [PROMPT.format("<v*>")], seeds=[SEED], width=64, height=64)
    plain = sample_student(pair, [PROMPT.format("a")], seeds=[SEED], width=64, height=64)
    return {"ours": ours, "plain": plain, **exports}


@pytest.fixture(scope="module")
def comfy_modules():
    """ComfyUI's own detection modules, imported in this process on the CPU (as test_nodes imports ComfyUI)."""
    root = comfy_support.require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    return {name: importlib.import_module(f"comfy.{name}")
            for name in ("utils", "model_detection", "supported_models", "sdxl_clip")}


def _graph(lora_name: str, prefix: str, strength: float = 1.0) -> dict:
    return comfy_support.lora_graph(CHECKPOINT, lora_name, PROMPT.format(f"embedding:{EMBEDDING}"), SEED, prefix,
                                    strength=strength)


def _latent(server, prefix: str) -> torch.Tensor:
    latent_file = next((server.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    return load_file(str(latent_file))["latent_tensor"].float()  # (1, 4, 8, 8)


def test_comfyui_detects_the_mini_checkpoint_as_sdxl(mini_sdxl, comfy_modules):
    """ComfyUI's own detection (the one CheckpointLoaderSimple runs) picks its SDXL model and both SDXL text towers."""
    state = comfy_modules["utils"].load_torch_file(str(mini_sdxl["checkpoint"]))
    config = comfy_modules["model_detection"].model_config_from_unet(state, "model.diffusion_model.")
    assert type(config) is comfy_modules["supported_models"].SDXL
    assert config.unet_config["context_dim"] == 2048 and config.unet_config["adm_in_channels"] == 2816
    assert config.clip_target(state).clip is comfy_modules["sdxl_clip"].SDXLClipModel


@pytest.mark.parametrize("export", ["diff", "lowrank"])
def test_core_comfyui_nodes_reproduce_the_sdxl_student(export, concept, comfy_server):
    report = concept[export]
    log_before = len(comfy_server.log_text())
    entry = comfy_server.run(_graph(report.path.name, f"xl_interop_{export}"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log
    assert "does not exist, ignoring" not in log and "embedding will be ignored" not in log
    if export == "diff":  # the first graph on this checkpoint: the server loads it as SDXL
        assert "Requested to load SDXLClipModel" in log and "Requested to load SDXL\n" in log

    theirs = _latent(comfy_server, f"xl_interop_{export}")
    ours = concept["ours"].latents / SCALING
    scale = ours.abs().max().item()
    agreement = (theirs - ours).abs().max().item()
    print(f"\nSDXL {export}: max |ComfyUI - ours| latent {agreement:.2e} of max |latent| {scale:.1f}")
    # Same fp32 UNet maths in another order (ComfyUI's SGM UNet, its LoRA merge, its text towers and
    # Euler step): measured 1e-5 of the latent's magnitude, which the start noise dominates
    # (x̂0 = (x - sqrt(1 - ᾱ)·ε̂) / sqrt(ᾱ), 1 / sqrt(ᾱ_999) ≈ 14.6). 1e-4 leaves a factor 10, as the SD 2.x proof.
    assert agreement < 1e-4 * scale, agreement
    # The concept matters far beyond that agreement: the same seed without its token lands elsewhere.
    assert (concept["plain"].latents / SCALING - theirs).abs().max() > 10 * agreement

    png = comfy_server.image(entry["outputs"]["10"])
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    image_error = np.abs(image - concept["ours"].images[0].permute(1, 2, 0).numpy()).max()
    print(f"SDXL {export}: max |ComfyUI PNG - ours| {image_error:.2e}")
    assert image_error <= 1.0 / 255.0 + 1e-3  # 8-bit PNG quantization (1/255) plus round-off, as the SD 2.x proof


def test_without_the_lora_comfyui_misses_the_sdxl_student(concept, comfy_server):
    """The LoRA carries the student's K/V: at strength 0 the same graph lands elsewhere."""
    entry = comfy_server.run(_graph(concept["diff"].path.name, "xl_interop_off", strength=0.0))
    assert entry["status"]["status_str"] == "success", entry["status"]
    theirs = _latent(comfy_server, "xl_interop_off")
    ours = concept["ours"].latents / SCALING
    assert (theirs - ours).abs().max() > 1e-3 * ours.abs().max()  # 10x the agreement bound above
