"""Sampler speed options on the tiny pair: each leaves the images as they were, and the models usable."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

from echodistill.models.adapters import add_custom_diffusion
from echodistill.models.concept import add_concept_token, concept_embedding, set_concept_row
from echodistill.models.diffusion import alphas_cumprod_for
from echodistill.models.pair import load_model_pair
from echodistill.models.pristine import pristine
from echodistill.sampling import speed as sampling_speed
from echodistill.sampling.samplers import (
    SamplingError,
    denoise,
    euler_trailing_schedule,
    sample_student,
    sample_teacher,
)
from echodistill.sampling.speed import PromptCache, SamplerOptions, SamplerOptionsError

SIZE = 64
PROMPTS = ["a photo of a dog", "a red car", "a photo of a dog"]


@pytest.fixture(scope="module")
def pair(tiny_pair_folders):
    return load_model_pair(*tiny_pair_folders)


def _student(pair, options=None, prompts=PROMPTS, **kwargs):
    return sample_student(pair, prompts, seeds=0, width=SIZE, height=SIZE, options=options, **kwargs)


class EncoderCalls:
    """Counts text-encoder forwards and the prompts each one saw."""

    def __init__(self, text_encoder):
        self.batches: list[int] = []
        self.handle = text_encoder.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))


def test_unchanged_prompts_are_encoded_once(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)  # its own: an empty cache
    calls = EncoderCalls(pair.text_encoder)
    try:
        _student(pair)
        second = _student(pair, prompts=["a red car", "a photo of a dog", "a blue boat"])
    finally:
        calls.handle.remove()
    assert calls.batches == [2, 1]  # two distinct prompts, then only the new one
    uncached = _student(pair, SamplerOptions(cache_prompts=False), prompts=["a red car", "a photo of a dog",
                                                                              "a blue boat"])
    assert torch.equal(second.images, uncached.images)


def test_prompt_cache_is_invalidated_when_the_concept_row_changes(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    prompts = ["a photo of a <v*> dog"]
    before = _student(pair, prompts=prompts)
    row = concept_embedding(pair.text_encoder).concept_row.detach()
    set_concept_row(pair.text_encoder, row + 0.5)
    after = _student(pair, prompts=prompts)
    fresh = _student(pair, SamplerOptions(cache_prompts=False), prompts=prompts)
    assert not torch.equal(before.latents, after.latents)
    assert torch.equal(after.latents, fresh.latents)
    with torch.no_grad():  # an optimizer's in-place update is seen too
        concept_embedding(pair.text_encoder).concept_row.add_(0.25)
    stepped = _student(pair, prompts=prompts)
    assert not torch.equal(stepped.latents, after.latents)


def test_prompt_cache_keeps_the_most_recent_prompts():
    cache = PromptCache(capacity=2)
    encode = lambda prompts: torch.arange(len(prompts), dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    cache.encode(["a", "b"], "state", encode)
    cache.encode(["c"], "state", encode)
    assert list(cache.entries) == ["b", "c"]
    cache.encode(["c"], "other state", encode)
    assert list(cache.entries) == ["c"]


@pytest.mark.parametrize("options", [SamplerOptions(channels_last=True), SamplerOptions(fuse_qkv=True),
                                     SamplerOptions(compile=True, compile_backend="eager")],
                         ids=["channels_last", "fuse_qkv", "compile"])
def test_speed_options_give_the_same_images(pair, options):
    reference = _student(pair, SamplerOptions(cache_prompts=False))
    fast = _student(pair, options)
    assert (fast.latents - reference.latents).abs().max() <= 1e-5 * reference.latents.abs().max()
    assert (fast.images - reference.images).abs().max() <= 1e-5
    teacher = sample_teacher(pair, PROMPTS[:1], seeds=0, steps=3, width=SIZE, height=SIZE)
    teacher_fast = sample_teacher(pair, PROMPTS[:1], seeds=0, steps=3, width=SIZE, height=SIZE, options=options)
    assert (teacher_fast.latents - teacher.latents).abs().max() <= 1e-5 * teacher.latents.abs().max()


def test_fused_qkv_covers_self_attention_only_and_is_undone(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    unet = pair.student.unet
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    seen = {}

    def spy(module, args, kwargs):
        seen[module.is_cross_attention] = type(module.processor)

    hooks = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in attention]
    try:
        _student(pair, SamplerOptions(fuse_qkv=True))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen[False] is FusedAttnProcessor2_0  # self-attention fused
    assert seen[True] is not FusedAttnProcessor2_0  # cross-attention K/V carry the concept: untouched
    assert not any(isinstance(m.processor, FusedAttnProcessor2_0) for m in attention)  # restored after the call


def test_fused_qkv_follows_changed_weights_and_skips_wrapped_projections(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    _student(pair, SamplerOptions(fuse_qkv=True))
    attn1 = next(m for m in pair.student.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    with torch.no_grad():
        attn1.to_q.weight.mul_(1.5)  # an in-place change after the first fusion
    reference = _student(pair, SamplerOptions(cache_prompts=False))
    fused = _student(pair, SamplerOptions(fuse_qkv=True))
    assert (fused.latents - reference.latents).abs().max() <= 1e-5 * reference.latents.abs().max()
    with pristine(pair):  # a Custom-Diffusion adapter on attn2 leaves attn1 fusable
        add_custom_diffusion(pair.student.unet)
        assert len(sampling_speed._fusable_self_attention(pair.student.unet)) > 0
        attn1.to_q = torch.nn.Sequential(attn1.to_q)  # a wrapped projection is never fused
        assert attn1 not in sampling_speed._fusable_self_attention(pair.student.unet)
        attn1.to_q = attn1.to_q[0]


def test_channels_last_keeps_training_usable(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    _student(pair, SamplerOptions(channels_last=True))
    conv = pair.student.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with pristine(pair):
        params = add_custom_diffusion(pair.student.unet)
        out = pair.student.unet(torch.randn(1, 4, 8, 8), torch.tensor([999]),
                                encoder_hidden_states=torch.randn(1, 77, pair.text_encoder.config.hidden_size)).sample
        out.square().mean().backward()
        assert all(p.grad is not None for p in params)


def test_cuda_graph_needs_cuda_and_one_step(pair):
    with pytest.raises(SamplerOptionsError, match="cuda_graph=True needs the models on a CUDA device; they are on cpu"):
        _student(pair, SamplerOptions(cuda_graph=True))
    with pytest.raises(SamplingError, match="one-step student only"):
        sample_teacher(pair, PROMPTS, seeds=0, width=SIZE, height=SIZE, options=SamplerOptions(cuda_graph=True))
    with pytest.raises(SamplerOptionsError, match="pick one"):
        SamplerOptions(compile=True, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_the_eager_student(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders, device="cuda")
    eager = _student(pair)
    graphed = _student(pair, SamplerOptions(cuda_graph=True))
    again = _student(pair, SamplerOptions(cuda_graph=True))  # a replay of the same capture
    assert torch.allclose(graphed.latents, eager.latents, rtol=1e-4, atol=1e-4)
    assert torch.equal(graphed.latents, again.latents)


class HostTraffic(TorchDispatchMode):
    """Records reads of tensor values by the host and copies between the host and the model's device."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), .tolist()
            self.reads += 1
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        devices = {t.device.type for t in [*tensors, *[o for o in outs if isinstance(o, torch.Tensor)]]}
        if {"cpu", "meta"} <= devices:
            self.copies += 1
        return out


@pytest.mark.parametrize("steps", [2, 4])
def test_the_denoising_loop_never_talks_to_the_host(pair, steps):
    """On the meta device a host read raises and every host-device copy shows: one copy, whatever the steps."""
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(pair.student.unet.config)
    config = pair.student.scheduler_config
    alphas_cumprod = alphas_cumprod_for(config, "meta")
    schedule = euler_trailing_schedule(config, steps, alphas_cumprod_for(config))
    noise = torch.empty(2, 4, 8, 8, device="meta")
    cond = torch.empty(2, 77, pair.text_encoder.config.hidden_size, device="meta")
    with torch.no_grad(), HostTraffic() as traffic:
        denoise(meta_unet, noise, cond, None, 0.0, schedule, alphas_cumprod, pair.student.prediction_type)
    assert traffic.reads == 0
    assert traffic.copies == 1  # the schedule's ᾱ values, moved once before the loop
