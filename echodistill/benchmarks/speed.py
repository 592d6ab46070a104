"""Speed benchmarks: each prints a table and writes every number to JSON.

    echodistill bench sample --model sd --device cuda --dtype bf16 --batch 1 16
    echodistill bench train --model sd --device cuda --presets paper balanced lite --steps 10

`bench sample` times our one-step student (`sample_student`) against diffusers'
StableDiffusionPipeline built from the SAME modules (Euler "trailing", 1 step, guidance 0,
output_type "pt"), side by side in one run. `bench train` times one EchoDistill
`Trainer.train_step` per preset against a teacher-only Custom-Diffusion iteration on the same
models, with the preset's batch size, precision and checkpointing.

What each number is:
- times: `warmup` untimed calls (at least one), then `repeats` timed ones, each between two
  device syncs; reported as p50/p95 (linear interpolation) and all raw values. The two sides of
  `bench sample` are timed interleaved (ABBA), so a fluctuating background load hits both;
  `bench train` cases run one after the other (both adapt the teacher). `bench sample` also
  makes one untimed priming call per side before any memory window opens.
- memory: CUDA: `max_memory_allocated` after a reset (exact); CPU: the process RSS sampled by
  psutil every 5 ms (null without psutil). The window is a case's setup + warm-up calls;
  `growth` is over its start, i.e. what the case adds to the already loaded models. CPU growth
  is a lower bound: memory the allocator kept from earlier work is reused without growing RSS.
- FLOPs: `FlopCounterMode` over one extra call (matmuls, convolutions and attention; not
  elementwise ops or norms). The CPU flash-attention kernels have no formula in torch, so one is
  registered here; CPU and CUDA counts therefore agree. Gradient checkpointing's recompute is
  counted: these are executed FLOPs, not model FLOPs.
- utilisation: achieved TFLOP/s (FLOPs / p50) over the device's dense fp16/bf16 tensor-core
  peak from `PEAK_TFLOPS`; null where the device is not in the table (every CPU).

`--model sd` times the real SD-Turbo / SD 2.1 base architectures with random weights
(random_pairs.py), `--model sdxl` the real SDXL-Turbo / SDXL base ones (peer: diffusers'
StableDiffusionXLPipeline); `--model tiny` the test suite's tiny pair. With `sd` or `sdxl` the command
adds `flops_by_model` to the report (`meta_run.flops_by_model`): both lines' FLOPs per image / per
iteration at the run's size, counted on the meta device through the same code path, so SDXL's cost
stands next to SD 2.x's whichever one was timed; `flops_lines` prints it under the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Callable

import torch

from ..training.config import PRESETS, TrainConfig, preset
from .measuring import (
    PEAK_BASIS,
    PEAK_TFLOPS,
    PROJECTED_ITERATIONS,
    BenchError,
    Measurement,
    MemoryProbe,
    check_device,
    count_flops,
    device_name,
    measure,
    peak_tflops,
    rates,
    ratio,
)
from .random_pairs import build_pair

if TYPE_CHECKING:  # models imports diffusers: load it only when a benchmark runs
    from ..models.pair import ModelPair
    from ..sampling.speed import SamplerOptions

__all__ = ["PEAK_TFLOPS", "BenchError", "Measurement", "MemoryProbe", "bench_sample", "bench_train", "build_pair",
           "count_flops", "peak_tflops"]


# --- bench sample --------------------------------------------------------------------------------

def diffusers_pipeline(pair: ModelPair):
    """diffusers' one-step pipeline over the pair's own student, text encoder(s) and VAE: StableDiffusionPipeline
    (SD-Turbo) or StableDiffusionXLPipeline (SDXL-Turbo, both text encoders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(pair.student.scheduler_config, timestep_spacing="trailing")
    if pair.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=pair.vae, text_encoder=pair.text_encoder, text_encoder_2=pair.text_encoder_2,
            tokenizer=pair.tokenizer, tokenizer_2=pair.tokenizer_2, unet=pair.student.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=pair.teacher.config.force_zeros_for_empty_prompt,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=pair.vae, text_encoder=pair.text_encoder, tokenizer=pair.tokenizer, unet=pair.student.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sample(
    model: str = "sd", device: str = "cpu", dtype: str | None = None, batches: tuple[int, ...] = (1, 16),
    size: int = 512, repeats: int = 10, warmup: int = 2, options: "SamplerOptions | None" = None,
) -> dict:
    """Latency, throughput, memory and FLOPs of `sample_student` (with `options`) vs diffusers, per batch size."""
    from ..sampling.samplers import sample_student
    from ..sampling.speed import SamplerOptions

    options = options or SamplerOptions()

    torch_device = check_device(device)
    dtype = dtype or ("bf16" if torch_device.type == "cuda" else "fp32")
    if min(batches) < 1 or repeats < 1 or warmup < 0:
        raise BenchError(
            f"batches {batches}, repeats {repeats}, warmup {warmup}: need batches, repeats >= 1, warmup >= 0"
        )
    name = device_name(torch_device)
    peak = peak_tflops(name)
    pair = build_pair(model, torch_device, dtype, with_teacher=False)
    pipe = diffusers_pipeline(pair)
    results = []
    for batch in batches:
        prompts = [f"a photo of a dog, picture {i}" for i in range(batch)]  # distinct: both encode every prompt
        seeds = list(range(batch))

        def ours():
            return sample_student(pair, prompts, seeds=seeds, width=size, height=size, return_latents=False,
                                  options=options).images

        def peer():
            generators = [torch.Generator().manual_seed(s) for s in seeds]  # CPU noise, as ours draws it
            return pipe(prompt=prompts, height=size, width=size, num_inference_steps=1, guidance_scale=0.0,
                        output_type="pt", generator=generators).images

        _log(f"sample: batch {batch}, echodistill and diffusers interleaved")
        # One priming call each, outside any memory window: one-time caches (oneDNN primitives,
        # tokenizer) would otherwise count against whichever side is measured first.
        ours(), peer()
        measured = measure({"echodistill": lambda: ours, "diffusers": lambda: peer}, torch_device, warmup, repeats)
        row = {"batch": batch}
        for impl, measurement in measured.items():
            row[impl] = rates(measurement, "latency", peak)
            row[impl]["images_per_s"] = batch / (row[impl]["latency_ms"]["p50"] / 1e3)
        row["ratios"] = _ratios(row["echodistill"], row["diffusers"], "latency_ms", "images_per_s")
        results.append(row)
    return {
        "benchmark": "sample",
        "settings": {"model": model, "device": str(torch_device), "dtype": dtype, "batches": list(batches),
                     "size": size, "repeats": repeats, "warmup": warmup, "steps": 1, "guidance": 0.0,
                     "options": dataclasses.asdict(options),
                     "peer": f"diffusers {type(pipe).__name__}, EulerDiscreteScheduler trailing, same modules"},
        "device": _device_facts(torch_device, name, peak),
        "notes": ["ratios are echodistill / diffusers: below 1 is better for latency, above 1 for images/s",
                  "both sides run the same student UNet, text encoder(s) and VAE objects; with --model sd or sdxl "
                  "the teacher UNet is not built (sampling never calls it)",
                  "echodistill returns images on the CPU (its contract); diffusers' output_type 'pt' leaves them "
                  "on the device",
                  "with cache_prompts (the default) repeated calls reuse the prompt embeddings; diffusers re-encodes "
                  "every call: --no-prompt-cache times both doing the same work"],
        "results": results,
    }


def _ratios(ours: dict, peer: dict, per_call: str, throughput: str | None = None) -> dict:
    ratios = {f"{per_call}_p50": ratio(ours[per_call]["p50"], peer[per_call]["p50"]),
              f"{per_call}_p95": ratio(ours[per_call]["p95"], peer[per_call]["p95"]),
              "memory_growth": ratio(ours["memory"]["growth_mb"], peer["memory"]["growth_mb"]),
              "flops": ratio(ours["flops"], peer["flops"])}
    if throughput:
        ratios[throughput] = ratio(ours[throughput], peer[throughput])
    return ratios


def _device_facts(device: torch.device, name: str, peak: float | None) -> dict:
    import diffusers

    return {"name": name, "type": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_threads": torch.get_num_threads(), "peak_tflops": peak, "peak_basis": PEAK_BASIS,
            "memory_method": MemoryProbe.method(device) or "psutil is not installed: CPU memory not measured"}


# --- bench train ---------------------------------------------------------------------------------

def synthetic_concept_images(count: int = 4, size: int = 512):
    """A made-up subject (an orange disc with a dark bar) on varied backgrounds, as ConceptImages."""
    from PIL import Image, ImageDraw

    from ..training.data import load_concept_images

    pictures = []
    for i in range(count):
        picture = Image.new("RGB", (size, size), (60 + 40 * i, 150, 190 - 30 * i))
        draw = ImageDraw.Draw(picture)
        left, top, side = size // 5 + i * size // 20, size // 4, size // 2
        draw.ellipse((left, top, left + side, top + side), fill=(240, 140, 30))
        draw.rectangle((left + side // 3, top + side // 4, left + side // 2, top + 3 * side // 4), fill=(40, 30, 30))
        pictures.append(picture)
    return load_concept_images(pictures, resolution=size)


def echodistill_step(pair: ModelPair, images, config: TrainConfig) -> Callable[[], object]:
    from ..training.trainer import Trainer

    return Trainer(pair, images, config).train_step


def custom_diffusion_step(pair: ModelPair, images, config: TrainConfig) -> Callable[[], float]:
    """The peer: one teacher-only Custom-Diffusion iteration (what EchoDistill's step 1 alone costs).

    Masked denoising loss on the real latents; AdamW on the teacher's K/V deltas + the token row;
    same batch size, precision, checkpointing, clipping and optimizer settings as `config`.
    """
    from ..models.adapters import add_custom_diffusion
    from ..models.concept import add_concept_tokens, concept_rows
    from ..models.diffusion import alphas_cumprod_for, unet_call
    from ..models.schedule import add_noise, denoising_target
    from ..training.data import ConceptDataset
    from ..training.losses import masked_denoising_loss

    device, vae, unet = pair.device, pair.vae, pair.teacher.unet
    add_concept_tokens(pair.tokenizers, pair.text_encoders, config.token, config.initializer_word)
    adapters, rows = add_custom_diffusion(unet), concept_rows(pair.text_encoders)  # K/V deltas, a row per encoder
    params = adapters + rows
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(config.parameter_groups(adapters, rows, config.lr_teacher),
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    dataset = ConceptDataset.from_config(images, config, pair.vae_downscale)
    abar = alphas_cumprod_for(pair.teacher.scheduler_config, device)  # (T,)
    generator = torch.Generator().manual_seed(config.seed)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)

    def step() -> float:
        batch = dataset.sample_batch(config.batch_size, generator)
        with torch.no_grad():
            posterior = vae.encode(batch.pixel_values.to(device, vae.dtype)).latent_dist
            draw = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents = (posterior.mean + posterior.std * draw).float() * vae.config.scaling_factor  # (B, 4, h, w)
        autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
        with autocast:
            cond = pair.conditioner.encode(batch.prompts, size=(config.resolution, config.resolution))  # (B, 77, D)
            noise = torch.randn(latents.shape, generator=generator).to(device)  # (B, 4, h, w)
            t = torch.randint(0, len(abar), (latents.shape[0],), generator=generator).to(device)  # (B,)
            prediction = unet_call(unet, add_noise(latents, noise, t, abar), t, cond)  # (B, 4, h, w)
        target = denoising_target(latents, noise, t, abar, pair.teacher.prediction_type)
        loss = masked_denoising_loss(prediction, target, batch.mask.to(device)).mean()
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench_train(
    model: str = "sd", device: str = "cpu", dtype: str = "fp32", presets: tuple[str, ...] = tuple(PRESETS),
    steps: int = 10, warmup: int = 2, resolution: int = 512,
) -> dict:
    """Seconds per iteration, memory and FLOPs of `Trainer.train_step` per preset vs Custom Diffusion."""
    from ..models.pristine import pristine

    torch_device = check_device(device)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or steps < 1 or warmup < 0:
        raise BenchError(f"presets {list(presets)} (valid: {', '.join(PRESETS)}), steps {steps}, warmup {warmup}: "
                         "need known presets, steps >= 1, warmup >= 0")
    name = device_name(torch_device)
    peak = peak_tflops(name)
    pair = build_pair(model, torch_device, dtype)
    images = synthetic_concept_images(4, resolution)
    results = []
    for preset_name in presets:
        # Previews and checkpoints live in Trainer.train(), not in train_step: nothing to switch off here.
        config = preset(preset_name, resolution=resolution, class_word="toy")
        row = {"preset": preset_name, "config": {k: getattr(config, k) for k in
               ("batch_size", "mixed_precision", "gradient_checkpointing", "cache_latents", "offload", "adapter",
                "discriminators", "echo")}}
        for impl, make in (("echodistill", echodistill_step), ("custom_diffusion", custom_diffusion_step)):
            _log(f"train: {impl}, preset {preset_name}")
            # One case at a time: both adapt the teacher, so they cannot share the pair at once;
            # pristine hands each the untouched pair.
            with pristine(pair):
                measured = measure({impl: lambda: make(pair, images, config)}, torch_device, warmup, steps)
            row[impl] = rates(measured[impl], "seconds_per_iter", peak)
        row["overhead"] = _ratios(row["echodistill"], row["custom_diffusion"], "seconds_per_iter_s")
        row["projected_1000_iters_s"] = {impl: row[impl]["seconds_per_iter_s"]["p50"] * PROJECTED_ITERATIONS
                                         for impl in ("echodistill", "custom_diffusion")}
        results.append(row)
    return {
        "benchmark": "train",
        "settings": {"model": model, "device": str(torch_device), "dtype": dtype, "presets": list(presets),
                     "steps": steps, "warmup": warmup, "resolution": resolution, "concept_images": len(images),
                     "peer": "teacher-only Custom Diffusion iteration on the same models and preset settings"},
        "device": _device_facts(torch_device, name, peak),
        "notes": [f"projected_1000_iters_s is PROJECTED: p50 seconds/iter x {PROJECTED_ITERATIONS}; it leaves out "
                  "echo rounds, the larger teacher batch once echo starts, previews and checkpoints",
                  "overhead ratios are echodistill / custom_diffusion"],
        "results": results,
    }


def flops_lines(report: dict) -> str:
    """The `flops_by_model` comparison as lines under a table ("" when there is none)."""
    compared = report.get("flops_by_model")
    if not compared:
        return ""
    size = report["settings"].get("size", report["settings"].get("resolution"))
    unit = "image" if report["benchmark"] == "sample" else "iteration"
    rows = {"": compared} if report["benchmark"] == "sample" else {f"{k}: ": v for k, v in compared.items()}
    lines = [f"\nFLOPs per {unit} at {size} px, counted on the meta device (same code path, both lines):"]
    for label, counts in rows.items():
        lines.append(f"  {label}SD 2.x {counts['sd'] / 1e9:,.1f} GFLOP, SDXL {counts['sdxl'] / 1e9:,.1f} GFLOP "
                     f"(SDXL / SD 2.x = {counts['sdxl'] / counts['sd']:.2f}x)")
    return "\n".join(lines)


# --- tables -----------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [headers, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _measured_cells(case: dict, per_call: str, digits: str) -> list[str]:
    return [_fmt(case[per_call]["p50"], digits), _fmt(case[per_call]["p95"], digits),
            _fmt(case["memory"]["growth_mb"], ".1f"), _fmt(case["flops"] / 1e9, ".2f"),
            _fmt(case["tflops_per_s"], ".4f"), _fmt(case["utilisation_pct"], ".1f")]


def sample_table(report: dict) -> str:
    s, d = report["settings"], report["device"]
    rows = []
    for row in report["results"]:
        for impl in ("echodistill", "diffusers"):
            case = row[impl]
            rows.append([str(row["batch"]), impl, *_measured_cells(case, "latency_ms", ".1f"),
                         _fmt(case["images_per_s"], ".3f")])
        r = row["ratios"]
        rows.append([str(row["batch"]), "ours/peer", _fmt(r["latency_ms_p50"], ".3f") + "x",
                     _fmt(r["latency_ms_p95"], ".3f") + "x", _fmt(r["memory_growth"], ".2f") + "x",
                     _fmt(r["flops"], ".3f") + "x", "", "", _fmt(r["images_per_s"], ".3f") + "x"])
    switched_on = [name for name, value in s["options"].items() if value is True] or ["none"]
    title = (f"bench sample: model {s['model']}, {s['size']}x{s['size']}, {s['dtype']}, {s['repeats']} timed + "
             f"{s['warmup']} warm-up calls; echodistill options: {', '.join(switched_on)}\ndevice: {d['name']}; peak {_fmt(d['peak_tflops'], '.0f')} TFLOP/s; "
             f"memory: {d['memory_method']}")
    headers = ["batch", "impl", "p50 ms", "p95 ms", "mem+ MB", "GFLOP/call", "TFLOP/s", "util %", "img/s"]
    return title + "\n" + format_table(headers, rows) + flops_lines(report)


def train_table(report: dict) -> str:
    s, d = report["settings"], report["device"]
    rows = []
    for row in report["results"]:
        for impl in ("echodistill", "custom_diffusion"):
            rows.append([row["preset"], impl, *_measured_cells(row[impl], "seconds_per_iter_s", ".3f"),
                         _fmt(row["projected_1000_iters_s"][impl], ".0f")])
        o = row["overhead"]
        rows.append([row["preset"], "overhead", _fmt(o["seconds_per_iter_s_p50"], ".2f") + "x",
                     _fmt(o["seconds_per_iter_s_p95"], ".2f") + "x", _fmt(o["memory_growth"], ".2f") + "x",
                     _fmt(o["flops"], ".2f") + "x", "", "", ""])
    title = (f"bench train: model {s['model']}, {s['resolution']} px, weights {s['dtype']}, {s['steps']} timed + "
             f"{s['warmup']} warm-up iterations\ndevice: {d['name']}; peak {_fmt(d['peak_tflops'], '.0f')} TFLOP/s; "
             f"memory: {d['memory_method']}")
    headers = ["preset", "impl", "s/it p50", "s/it p95", "mem+ MB", "GFLOP/it", "TFLOP/s", "util %",
               f"{PROJECTED_ITERATIONS} it s (projected)"]
    return title + "\n" + format_table(headers, rows) + flops_lines(report)


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
