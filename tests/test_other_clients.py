"""Our exports in a second client: diffusers loads the default LoRA export and the embedding
file with nothing more than a path, at strength exactly 1, and draws the same picture as our
one-step student. Also: conv-layer LoRAs export in kohya's conv layout, and the student's
"comfyui_turbo" schedule is ComfyUI's own SDTurboScheduler.
"""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import bundle_deltas, export_embedding, export_lora
from echodistill.concepts.reference import apply_kohya_lora
from echodistill.jobs.runs import sample
from echodistill.models.adapters import adapter_state_dict, add_custom_diffusion, add_lora
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import alphas_cumprod_for, initial_noise, student_schedule

import comfy_support

PROMPT = "a photo of {} dog"


def _bundle(pair, adapter="custom_diffusion", targets=("attn2.to_k", "attn2.to_v"), extra_modules=(), seed=0):
    """A bundle with random, far-from-zero adapter weights and token rows (one per text encoder: two on an
    SDXL pair) on a tiny pair; `extra_modules` adds
    custom-diffusion ΔW on further Linear layers (so full-rank factors differ in rank per layer)."""
    generator = torch.Generator().manual_seed(seed)
    states = {}
    for part in ("student", "teacher"):
        unet = copy.deepcopy(getattr(pair, part).unet)
        if adapter == "custom_diffusion":
            add_custom_diffusion(unet)
        else:
            add_lora(unet, 3, 6.0, targets)
        state = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in adapter_state_dict(unet).items()}
        for name, module in unet.named_modules():
            if name.endswith(extra_modules) and extra_modules and isinstance(module, torch.nn.Linear):
                state[f"{name}.delta"] = torch.randn(module.weight.shape, generator=generator) * 0.05
        states[part] = state
    rows = [torch.randn(encoder.config.hidden_size, generator=generator) for encoder in pair.text_encoders]
    return ConceptBundle(
        token="<v*>", initializer="dog", class_word="dog", embedding=rows[0],
        embedding_2=rows[1] if len(rows) > 1 else None, adapter=adapter, student_adapter=states["student"], teacher_adapter=states["teacher"],
        fingerprints=pair.fingerprints(), families={"teacher": pair.teacher.family, "student": pair.student.family},
        config={"adapter": adapter, "lora_rank": 3, "lora_alpha": 6.0, "lora_targets": list(targets)}, step=5,
    )


def diffusers_one_step(pipe, prompt: str, scheduler_config: dict, seed: int = 11) -> torch.Tensor:
    """The pipeline's one-step picture (1, 3, 64, 64) from our noise of `seed`: diffusers' trailing Euler starts
    at σ_max·noise and ours (as ComfyUI) at unit noise, so the noise is rescaled to line them up."""
    alpha_bar = float(alphas_cumprod_for(scheduler_config, torch.device("cpu"))[999])
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    noise = initial_noise([seed], (4, 8, 8)) * (1 + sigma**2) ** 0.5 / sigma
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=1, guidance_scale=0.0, latents=noise, height=64, width=64,
                    output_type="pt").images


def _pipeline(pair_folders) -> StableDiffusionPipeline:
    """A diffusers pipeline over a fresh copy of the tiny student, built only from public classes."""
    pair = load_model_pair(*pair_folders)
    scheduler = EulerDiscreteScheduler.from_config(pair.student.scheduler_config, timestep_spacing="trailing")
    return StableDiffusionPipeline(
        vae=pair.vae, text_encoder=pair.text_encoder, tokenizer=pair.tokenizer, unet=pair.student.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _weights(unet) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n and "base_layer" not in n}


def _fused(pipe) -> dict[str, torch.Tensor]:
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return _weights(pipe.unet)


def test_default_export_loads_in_diffusers_at_strength_one_even_with_mixed_ranks(tiny_pair_folders, tmp_path):
    """Full-rank factors differ in rank per layer here (32 on K/V and 32-wide layers, 64 on the 64-wide
    self-attention queries); every layer must still load as W + ΔW, not alpha_common / r · ΔW."""
    pair = load_model_pair(*tiny_pair_folders)
    bundle = _bundle(pair, extra_modules=("attn1.to_q",))
    report = export_lora(bundle, tmp_path / "concept.safetensors")  # the default export
    assert report.mode == "lowrank" and report.max_error < 1e-5
    state = load_file(report.path)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    assert len(ranks) > 1, ranks  # the case diffusers got wrong
    assert len({float(v) for k, v in state.items() if k.endswith(".alpha")}) == 1

    pipe = _pipeline(tiny_pair_folders)
    before = _weights(pipe.unet)
    pipe.load_lora_weights(str(report.path))  # no adapter name, no scale: what a user writes
    after = _fused(pipe)
    deltas = bundle_deltas(bundle, "student")
    assert set(deltas) <= set(after)
    for name, weight in after.items():
        if name in deltas:
            strength = float((weight - before[name]).flatten() @ deltas[name].flatten() / deltas[name].norm() ** 2)
            assert abs(strength - 1.0) < 1e-4, f"{name} loads at strength {strength:.3f}"
            torch.testing.assert_close(weight, before[name] + deltas[name], rtol=0, atol=2e-5)
        else:
            assert torch.equal(weight, before[name]), name


def test_diffusers_draws_our_students_picture_from_the_exports(tiny_pair_folders, tmp_path):
    """LoRA + embedding loaded by path only (no token=) give our sampler's image for the same prompt."""
    pair = load_model_pair(*tiny_pair_folders)
    bundle = _bundle(pair, seed=3)
    lora = export_lora(bundle, tmp_path / "lora" / "mug.safetensors").path
    embedding = export_embedding(bundle, tmp_path / "embeddings" / "mug.safetensors")
    prompt = PROMPT.format(bundle.token)
    ours = sample(pair, [prompt], concept=bundle, seeds=[11], width=64, height=64)

    pipe = _pipeline(tiny_pair_folders)
    pipe.load_lora_weights(str(lora))
    pipe.load_textual_inversion(str(embedding))  # the token comes from the file
    assert bundle.token in pipe.tokenizer.get_vocab()
    theirs = diffusers_one_step(pipe, prompt, pair.student.scheduler_config)
    error = (theirs - ours.images).abs().max().item()
    assert error < 1e-4, error
    # The concept matters far beyond that agreement.
    plain = sample(pair, [PROMPT.format("a")], seeds=[11], width=64, height=64)
    assert (plain.images - ours.images).abs().max().item() > 100 * max(error, 1e-6)


def test_conv_lora_exports_as_comfyui_reads_it(tiny_pair_folders, tmp_path):
    """LoRA on resnet conv1 (3x3) trains; every export mode writes it, and applied to a plain UNet it
    is the bundle-applied student; diffusers loads the default export too."""
    pair = load_model_pair(*tiny_pair_folders)
    bundle = _bundle(pair, adapter="lora", targets=("attn2.to_k", "conv1"), seed=5)
    fresh = load_model_pair(*tiny_pair_folders)
    bundle.apply(fresh, parts=("student",))
    torch.manual_seed(0)
    sample_in, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = fresh.student.unet(sample_in, 10, encoder_hidden_states=hidden).sample
    for mode, rank in (("lowrank", None), ("diff", None), ("lowrank", 2)):
        report = export_lora(bundle, tmp_path / f"conv_{mode}_{rank}.safetensors", mode=mode, rank=rank,
                             unet_config=dict(pair.student.unet.config))
        state = load_file(report.path)
        conv_down = [v for k, v in state.items() if "conv1.lora_down" in k]
        if mode == "lowrank":
            assert conv_down and all(v.dim() == 4 for v in conv_down)
            assert all(v.shape[2:] == (1, 1) for k, v in state.items() if "conv1.lora_up" in k)
        base = load_model_pair(*tiny_pair_folders).student.unet
        patched = apply_kohya_lora(base, state)
        assert any("conv1" in name for name in patched)
        if rank is None:
            with torch.no_grad():
                got = base(sample_in, 10, encoder_hidden_states=hidden).sample
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    pipe = _pipeline(tiny_pair_folders)
    before = _weights(pipe.unet)
    pipe.load_lora_weights(str(tmp_path / "conv_lowrank_None.safetensors"))
    after = _fused(pipe)
    for name, delta in bundle_deltas(bundle, "student").items():
        torch.testing.assert_close(after[name], before[name] + delta, rtol=0, atol=2e-5)


class _FakeModelSampling:
    """sigma(t) = t: ComfyUI's scheduler then hands back its timesteps unchanged."""

    def sigma(self, timesteps):
        return timesteps.float()


class _FakeModel:
    def get_model_object(self, name):
        assert name == "model_sampling"
        return _FakeModelSampling()


@pytest.fixture(scope="module")
def comfy_custom_sampler():
    """ComfyUI's own custom-sampler nodes (CPU), imported as test_nodes imports ComfyUI."""
    root = comfy_support.require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    return importlib.import_module("comfy_extras.nodes_custom_sampler")


@pytest.mark.parametrize("steps", range(1, 11))
def test_comfyui_turbo_schedule_is_comfyuis_sd_turbo_scheduler(steps, comfy_custom_sampler, tiny_pair_folders):
    sigmas = comfy_custom_sampler.SDTurboScheduler.get_sigmas(_FakeModel(), steps, 1.0)[0]
    theirs = tuple(int(t) for t in sigmas[:-1].tolist())
    pair = load_model_pair(*tiny_pair_folders)
    config = pair.student.scheduler_config
    ours = student_schedule("comfyui_turbo", config, steps, alphas_cumprod_for(config, torch.device("cpu")))
    assert ours.timesteps == theirs
    assert ours.next_alpha_bars[-1] is None  # ComfyUI's last sigma is 0: the last step returns x̂0
    trailing = student_schedule("trailing", config, steps, alphas_cumprod_for(config, torch.device("cpu")))
    if 2 <= steps <= 4:
        assert trailing.timesteps != theirs  # why the option exists
