"""FLOPs and peak tensor memory of the real code paths, counted on the meta device without computing.

    sample_cost("sdxl", size=512)              # one image: text encoders, one student UNet call, VAE decode
    train_cost("sdxl", "lite", resolution=512)  # one Trainer.train_step: FLOPs, peak bytes and their parts
    teacher_pass_cost("sdxl", "lite", 1024)     # the teacher's own denoising iteration alone

Meta tensors carry shapes and dtypes but no data, so the real SDXL and SD 2.x architectures run
`sample_student` and `Trainer.train_step` on any machine in seconds to minutes, with no weights and
no device. FLOPs come from torch's `FlopCounterMode` (matmuls, convolutions, attention; forward and
backward); bytes from a dispatch mode that follows every tensor storage from its creation to its
release, so the peak is the largest sum of live tensor bytes, which is what
`torch.cuda.max_memory_allocated` reports on a GPU (the caching allocator's rounding and reserve, the
CUDA context (~0.5 GB) and cuDNN/cuBLAS workspaces come on top).

What differs from a run on a device, and what it costs the estimate:
- host reads of a meta value (`.item()`, `bool()`, `.tolist()`, `.cpu()`) get stand-ins: 0 for
  numbers, True for flags, zeros for copies, except for tensors that were copied from the host as
  they are (the noise schedule's ᾱ table, timesteps), which read back their values. The trainer's NaN
  check passes and its logged losses read 0; no control flow of one sampling call or training
  iteration depends on a computed value.
- autocast has no meta backend, so the presets' bf16 autocast is replaced by weights loaded in bf16
  (what `--dtype bf16` loads) and no autocast: matmuls and convolutions produce bf16 as under
  autocast, but the norms and softmaxes that autocast runs in fp32 are counted in bf16 here.
- attention on meta tensors is routed to the fused (flash) attention op that CPUs run, as GPUs run
  theirs: without it SDPA would take its math path on meta and store every (tokens x tokens)
  attention matrix for backward, which no fused kernel does (at SD 2.x's 64 x 64 latent level that is
  about 0.17 GB per attention layer and image). FLOPs and bytes then agree with a CPU run of the tiny
  pair (`tests/test_bench.py`).
- `offload` moves nothing (there is no second device): the text encoders and the VAE stay counted
  for the whole iteration, an upper bound for `lite` on CUDA, where they wait on the CPU while the
  UNets run.
"""

from __future__ import annotations

import gc
import sys
import weakref
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..training.config import PRESETS, preset
from .measuring import CPU_ATTENTION_FLOPS, BenchError
from .random_pairs import MODELS, build_pair

if TYPE_CHECKING:
    from ..models.pair import ModelPair

META = torch.device("meta")
GB = 1e9  # decimal gigabytes, as GPU memory is sold


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """`F.scaled_dot_product_attention` as the fused CPU kernel computes it, for meta tensors (shapes and the
    tensors saved for backward: q, k, v, the output and its log-sum-exp); anything else goes to torch's own."""
    if query.device.type != "meta" or kwargs.get("enable_gqa"):
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     **kwargs)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


class MetaExecution(TorchDispatchMode):
    """Runs code on meta tensors to the end and tracks the bytes of every live tensor storage.

    `existing` tensors (weights, buffers) are counted from the start. `live` is the current sum of
    distinct storages' bytes, `peak` its maximum since the last `reset_peak()`. Inside it,
    `F.scaled_dot_product_attention` on meta tensors runs the fused attention op (see the module's notes).
    """

    def __enter__(self):
        torch.nn.functional.scaled_dot_product_attention = _fused_attention
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = _SDPA
        return super().__exit__(*exc)

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._host: dict[int, torch.Tensor] = {}  # meta storage -> the host values copied into it
        for tensor in existing:
            self._track(tensor)
        self.peak = self.live

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata  # one per storage, shared by its views
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._host.pop(key, None)

    def _read_back(self, tensor: torch.Tensor, device, dtype) -> torch.Tensor:
        """A host copy of a meta tensor: its values where they came from the host, zeros otherwise."""
        values = self._host.get(tensor.untyped_storage()._cdata)
        if values is None:
            return torch.zeros(tensor.shape, dtype=dtype or tensor.dtype, device=device)
        view = values.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
        return view.to(device=device, dtype=dtype or tensor.dtype, copy=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        target = kwargs.get("device")
        copy = func is torch.ops.aten._to_copy.default and isinstance(first, torch.Tensor) and target is not None
        if isinstance(first, torch.Tensor) and first.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), bool(), .tolist()
                if first.untyped_storage()._cdata in self._host:
                    return self._read_back(first, "cpu", None).item()
                return True if first.dtype == torch.bool else 0
            if copy and torch.device(target).type != "meta":
                return self._read_back(first, target, kwargs.get("dtype"))
        out = func(*args, **kwargs)
        if copy and first.device.type != "meta" and torch.device(target).type == "meta" and out.is_contiguous():
            self._host[out.untyped_storage()._cdata] = first.detach().to("cpu", out.dtype).contiguous().flatten()
        for tensor in tree_flatten(out)[0]:
            self._track(tensor)
        return out


def _module_bytes(module: torch.nn.Module, trainable: bool = False) -> int:
    """Bytes of a module's parameters and buffers; `trainable`: only the parameters that require grad."""
    if trainable:
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    tensors = [*(p for p in module.parameters() if not p.requires_grad), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if not p.requires_grad)


def _meta_pair(model: str, dtype: str, with_teacher: bool = True) -> "ModelPair":
    if model not in MODELS:
        raise BenchError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    return build_pair(model, META, dtype, with_teacher=with_teacher)


def _pair_tensors(pair: "ModelPair") -> list[torch.Tensor]:
    modules = {id(m): m for m in (pair.teacher.unet, pair.student.unet, *pair.text_encoders, pair.vae)}
    return [t for m in modules.values() for t in (*m.parameters(), *m.buffers())]


def frozen_weights(pair: "ModelPair") -> dict[str, dict[str, float]]:
    """Per frozen component: parameter count and bytes at the pair's dtype (a shared UNet counted once)."""
    parts = {"teacher_unet": pair.teacher.unet, "student_unet": pair.student.unet, "vae": pair.vae}
    for index, encoder in enumerate(pair.text_encoders, start=1):
        parts["text_encoder" if index == 1 else f"text_encoder_{index}"] = encoder
    if pair.teacher.unet is pair.student.unet:
        del parts["teacher_unet"]
    return {name: {"parameters": _parameters(m), "bytes": _module_bytes(m)} for name, m in parts.items()}


def sample_cost(model: str = "sdxl", size: int = 512, batch: int = 1, dtype: str = "bf16") -> dict:
    """FLOPs per image and peak tensor bytes of `sample_student` (1 step) at `size` x `size`, on the meta device.

    FLOPs: the text encoder(s) once per prompt, one student UNet call and one VAE decode per image.
    Returns {"model", "size", "batch", "dtype", "flops_per_image", "peak_bytes", "weights": frozen_weights}.
    Raises BenchError for an unknown model.
    """
    from ..sampling.samplers import sample_student
    from ..sampling.speed import SamplerOptions

    pair = _meta_pair(model, dtype, with_teacher=False)
    prompts = [f"a photo of a dog, picture {i}" for i in range(batch)]
    gc.collect()
    with MetaExecution(_pair_tensors(pair)) as tracker, \
            FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        sample_student(pair, prompts, seeds=list(range(batch)), width=size, height=size, return_latents=False,
                       options=SamplerOptions(cache_prompts=False))
    return {"model": model, "size": size, "batch": batch, "dtype": dtype,
            "flops_per_image": counter.get_total_flops() / batch, "peak_bytes": tracker.peak,
            "weights": frozen_weights(pair)}


def line_of(model: str) -> str:
    """The model line (`training.config.LINE_PRESETS`) a benchmark model belongs to."""
    return "sdxl" if model == "sdxl" else "sd"


def preset_dtype(name: str) -> str:
    """The weights dtype a preset is meant to run with: bf16 where it autocasts to bf16, else fp32."""
    return "bf16" if PRESETS[name].get("mixed_precision") == "bf16" else "fp32"


def train_cost(model: str = "sdxl", preset_name: str = "lite", resolution: int = 512, **overrides) -> dict:
    """FLOPs and peak tensor bytes of one `Trainer.train_step` of a preset, on the meta device.

    The preset is the model line's (`line_of`: SDXL's lite trains LoRA K/V). The pair's weights are in
    `preset_dtype(preset_name)`; the second iteration is measured (the first
    creates the AdamW moments). Bytes: the frozen weights per component; `trainable_bytes` the
    parameters that require grad (adapters, token rows, discriminator heads; fp32); `optimizer_bytes`
    their AdamW moments; `activation_bytes` = peak - what lives between iterations (activations, gradients,
    temporaries). All in bytes; FLOPs per iteration (forward + backward, checkpointing's recompute included).
    `overrides`: config fields changed on top of the preset (e.g. adapter="lora").
    Raises BenchError for an unknown model, ConfigError for an unknown preset or field.
    """
    from .speed import synthetic_concept_images
    from ..training.trainer import Trainer

    dtype = preset_dtype(preset_name) if preset_name in PRESETS else "fp32"
    config = preset(preset_name, line=line_of(model), resolution=resolution, class_word="toy", **overrides)
    # No autocast on meta (see the module's notes); the weights' dtype stands for it. Offload has no second device.
    meta_config = config.with_changes(mixed_precision="no", offload=False)
    pair = _meta_pair(model, dtype)
    images = synthetic_concept_images(4, resolution)
    gc.collect()
    with MetaExecution(_pair_tensors(pair)) as tracker:
        trainer = Trainer(pair, images, meta_config)
        trainer.train_step()  # creates the AdamW moments
        between = tracker.live
        tracker.reset_peak()
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            trainer.train_step()
        peak = tracker.peak
    optimizers = (trainer.teacher_optimizer, trainer.student_optimizer, trainer.heads_optimizer)
    trained = list({id(p): p for opt in optimizers for group in opt.param_groups for p in group["params"]}.values())
    trainable = sum(p.numel() * p.element_size() for p in trained)
    optimizer_bytes = sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
                          for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    weights = frozen_weights(pair)
    return {
        "model": model, "preset": preset_name, "resolution": resolution, "weights_dtype": dtype,
        "batch_size": config.batch_size, "gradient_checkpointing": config.gradient_checkpointing,
        "adapter": config.adapter, "overrides": overrides,
        "flops_per_iteration": counter.get_total_flops(), "peak_bytes": peak, "between_iterations_bytes": between,
        "weights": weights, "frozen_bytes": sum(w["bytes"] for w in weights.values()),
        "trainable_parameters": sum(p.numel() for p in trained),
        "trainable_bytes": trainable, "optimizer_bytes": optimizer_bytes, "activation_bytes": peak - between,
    }


def teacher_pass_cost(model: str = "sdxl", preset_name: str = "lite", resolution: int = 512) -> dict:
    """FLOPs and peak tensor bytes of the teacher's own iteration alone (masked denoising loss on the photos,
    AdamW on its K/V deltas and token rows: `speed.custom_diffusion_step`) at `resolution`, on the meta device;
    the second iteration is measured. What training the teacher at another size than the student changes.
    Raises BenchError for an unknown model, ConfigError for an unknown preset.
    """
    from .speed import custom_diffusion_step, synthetic_concept_images

    config = preset(preset_name, line=line_of(model), resolution=resolution, class_word="toy").with_changes(
        mixed_precision="no", offload=False)
    pair = _meta_pair(model, preset_dtype(preset_name))
    images = synthetic_concept_images(4, resolution)
    gc.collect()
    with MetaExecution(_pair_tensors(pair)) as tracker:
        step = custom_diffusion_step(pair, images, config)
        step()
        between = tracker.live
        tracker.reset_peak()
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            step()
    return {"model": model, "preset": preset_name, "resolution": resolution, "batch_size": config.batch_size,
            "flops_per_iteration": counter.get_total_flops(), "peak_bytes": tracker.peak,
            "activation_bytes": tracker.peak - between}


COMPARED_MODELS = ("sd", "sdxl")


def flops_by_model(model: str, kind: str, size: int, presets: tuple[str, ...] = ()) -> dict | None:
    """FLOPs of SD 2.x and SDXL at `size` px, counted on the meta device: per image for kind "sample"
    ({"sd": F, "sdxl": F}), per iteration of each preset for "train" ({preset: {"sd": F, "sdxl": F}}).
    None for the tiny pair (no line to compare with)."""
    if model not in COMPARED_MODELS:
        return None
    print(f"[bench] {kind}: FLOPs of {' and '.join(COMPARED_MODELS)} at {size} px on the meta device",
          file=sys.stderr, flush=True)
    if kind == "sample":
        return {m: sample_cost(m, size)["flops_per_image"] for m in COMPARED_MODELS}
    return {name: {m: train_cost(m, name, size)["flops_per_iteration"] for m in COMPARED_MODELS} for name in presets}
