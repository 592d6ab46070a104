"""Proof in a real ComfyUI: our exported LoRA + embedding reproduce our one-step student there.

Core nodes only: CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode("embedding:NAME") ->
SDTurboScheduler + KSamplerSelect(euler) -> SamplerCustom (cfg 1) -> SaveLatent / VAEDecode.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import comfy_support

from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import export_embedding, export_lora
from echodistill.models.adapters import adapter_state_dict, add_custom_diffusion
from echodistill.models.concept import add_concept_token, concept_embedding, set_concept_row
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import sample_student

SEED = 7
PROMPT = "a photo of {} toy"
# About 200 tokens, the concept in the second 77-token window: ComfyUI reads all of it.
LONG_PROMPT = ("a very detailed photograph of a small wooden shelf in a quiet sunlit room, " * 6
               + "and on it sits {} toy, " + "with soft shadows, warm colours, film grain and a shallow depth of field, " * 5)


@pytest.fixture(scope="module")
def concept(mini_sd2, comfy_models):
    """A concept with a distinctive token row and random student K/V deltas, exported twice."""
    pair = load_model_pair(mini_sd2["checkpoint"], mini_sd2["checkpoint"], teacher_family=mini_sd2["family"],
                           student_family=mini_sd2["family"])
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "toy")
    generator = torch.Generator().manual_seed(0)
    set_concept_row(pair.text_encoder, torch.randn(1024, generator=generator) * 0.5)
    add_custom_diffusion(pair.student.unet)
    add_custom_diffusion(pair.teacher.unet)
    with torch.no_grad():
        for name, param in pair.student.unet.named_parameters():
            if name.endswith(".delta"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    bundle = ConceptBundle(
        token="<v*>", initializer="toy", class_word="toy",
        embedding=concept_embedding(pair.text_encoder).concept_row.detach().clone(), adapter="custom_diffusion",
        student_adapter=adapter_state_dict(pair.student.unet), teacher_adapter=adapter_state_dict(pair.teacher.unet),
        fingerprints=pair.fingerprints(), families={"teacher": "mini", "student": "mini"},
    )
    diff = export_lora(bundle, comfy_models["loras"] / "echo_diff.safetensors", mode="diff")
    lowrank = export_lora(bundle, comfy_models["loras"] / "echo_lowrank.safetensors", mode="lowrank")
    export_embedding(bundle, comfy_models["embeddings"] / "echo_concept.safetensors")
    ours = sample_student(pair, [PROMPT.format("<v*>")], seeds=[SEED], width=64, height=64)
    plain = sample_student(pair, [PROMPT.format("a")], seeds=[SEED], width=64, height=64)
    three = {schedule: sample_student(pair, [PROMPT.format("<v*>")], seeds=[SEED], width=64, height=64, steps=3,
                                      schedule=schedule) for schedule in ("comfyui_turbo", "trailing")}
    long = {tail: sample_student(pair, [LONG_PROMPT.format("<v*>") + tail], seeds=[SEED], width=64, height=64)
            for tail in ("", "at night")}
    return {"ours": ours, "plain": plain, "diff": diff, "lowrank": lowrank, "three": three, "long": long}


def _graph(lora_name: str, prefix: str, strength: float = 1.0, steps: int = 1, prompt: str = PROMPT,
           ksampler: str | None = None) -> dict:
    return comfy_support.lora_graph("mini_turbo.ckpt", lora_name, prompt.format("embedding:echo_concept"), SEED,
                                    prefix, strength=strength, steps=steps, ksampler=ksampler)


@pytest.mark.parametrize("export", ["diff", "lowrank"])
def test_core_comfyui_nodes_reproduce_the_student(export, concept, comfy_server):
    report = concept[export]
    log_before = len(comfy_server.log_text())
    entry = comfy_server.run(_graph(report.path.name, f"interop_{export}"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = comfy_server.log_text()[log_before:]
    assert "lora key not loaded" not in log
    assert "embedding" not in log.lower() or "ignored" not in log.lower()

    # Latents: SaveLatent stores ComfyUI's raw VAE latents; ours are UNet-space (x 0.18215).
    latent_file = next((comfy_server.base / "output" / "latents").glob(f"interop_{export}_*.latent"))
    theirs = load_file(str(latent_file))["latent_tensor"].float()  # (1, 4, 8, 8)
    ours = concept["ours"].latents / 0.18215
    scale = ours.abs().max().item()
    # Same fp32 maths in a different order (24-layer text tower, UNet, LoRA merge): round-off only.
    # The low-rank export at full rank is ΔW and an identity factor: exact.
    assert torch.allclose(theirs, ours, atol=1e-4 * scale, rtol=0), (theirs - ours).abs().max()
    # The concept matters: the same seed without its token lands measurably elsewhere, far beyond
    # the agreement error (the noise term sqrt(1 + σ²)·noise dominates the latent's magnitude).
    agreement = (theirs - ours).abs().max()
    print(f"{export}: max |ComfyUI - ours| latent {agreement:.2e} of max |latent| {scale:.1f}")
    assert (concept["plain"].latents / 0.18215 - theirs).abs().max() > 10 * agreement

    # Images: ComfyUI's PNG is 8-bit, so one quantization step (1/255) plus round-off.
    png = comfy_server.image(entry["outputs"]["10"])
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    ours_image = concept["ours"].images[0].permute(1, 2, 0).numpy()
    image_error = np.abs(image - ours_image).max()
    print(f"{export}: max |ComfyUI PNG - ours| {image_error:.2e}")
    assert image_error <= 1.0 / 255.0 + 1e-3


def test_without_the_lora_comfyui_misses_the_student(concept, comfy_server):
    """The LoRA carries the student's K/V: at strength 0 the same graph lands elsewhere."""
    entry = comfy_server.run(_graph(concept["diff"].path.name, "interop_off", strength=0.0))
    assert entry["status"]["status_str"] == "success", entry["status"]
    latent_file = next((comfy_server.base / "output" / "latents").glob("interop_off_*.latent"))
    theirs = load_file(str(latent_file))["latent_tensor"].float()
    ours = concept["ours"].latents / 0.18215
    assert (theirs - ours).abs().max() > 1e-4 * ours.abs().max() * 10


def test_a_plain_ksampler_at_one_step_is_the_students_t999_step(concept, comfy_server):
    """KSampler(euler, sgm_uniform, 1 step, cfg 1), as the SDXL core-nodes workflow has it, draws exactly what
    SDTurboScheduler + SamplerCustom draw: one Euler step from sigma(t = 999) to 0, i.e. our student."""
    entry = comfy_server.run(_graph(concept["diff"].path.name, "interop_ksampler", ksampler="sgm_uniform"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    latent_file = next((comfy_server.base / "output" / "latents").glob("interop_ksampler_*.latent"))
    theirs = load_file(str(latent_file))["latent_tensor"].float()
    ours = concept["ours"].latents / 0.18215
    assert torch.allclose(theirs, ours, atol=1e-4 * ours.abs().max().item(), rtol=0), (theirs - ours).abs().max()


def test_comfyui_turbo_schedule_reproduces_core_nodes_at_three_steps(concept, comfy_server):
    """SDTurboScheduler (999/899/799) + euler in core nodes is our student with schedule="comfyui_turbo";
    our default "trailing" (999/666/333) is a different picture at the same step count."""
    entry = comfy_server.run(_graph(concept["lowrank"].path.name, "interop_three", steps=3))
    assert entry["status"]["status_str"] == "success", entry["status"]
    latent_file = next((comfy_server.base / "output" / "latents").glob("interop_three_*.latent"))
    theirs = load_file(str(latent_file))["latent_tensor"].float()
    ours = concept["three"]["comfyui_turbo"].latents / 0.18215
    scale = ours.abs().max().item()
    agreement = (theirs - ours).abs().max()
    print(f"3 steps: max |ComfyUI - ours (comfyui_turbo)| latent {agreement:.2e} of {scale:.1f}")
    assert torch.allclose(theirs, ours, atol=1e-4 * scale, rtol=0), agreement
    trailing = concept["three"]["trailing"].latents / 0.18215
    assert (trailing - theirs).abs().max() > 10 * agreement


def test_long_prompts_are_read_whole_as_core_clip_text_encode_does(concept, comfy_server):
    """A 200-token prompt: CLIPTextEncode encodes 77-token windows and concatenates them; so do our
    samplers, so the exported concept in core nodes draws our picture, and words after token 77 count."""
    entry = comfy_server.run(_graph(concept["lowrank"].path.name, "interop_long", prompt=LONG_PROMPT))
    assert entry["status"]["status_str"] == "success", entry["status"]
    latent_file = next((comfy_server.base / "output" / "latents").glob("interop_long_*.latent"))
    theirs = load_file(str(latent_file))["latent_tensor"].float()
    ours = concept["long"][""].latents / 0.18215
    scale = ours.abs().max().item()
    agreement = (theirs - ours).abs().max()
    print(f"long prompt: max |ComfyUI - ours| latent {agreement:.2e} of {scale:.1f}")
    assert torch.allclose(theirs, ours, atol=1e-4 * scale, rtol=0), agreement
    assert (concept["long"]["at night"].latents - concept["long"][""].latents).abs().max() > 0  # not cut at 77
