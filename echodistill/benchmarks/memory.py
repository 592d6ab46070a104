"""`bench memory`: each preset's estimated peak GPU memory and FLOPs per iteration, per model line.

    echodistill bench memory --models sd sdxl --presets paper balanced lite --resolution 512

Counted on the meta device (`meta_run.py`, which says what the estimate leaves out): the frozen
weights of both UNets, the text encoder(s) and the VAE in the preset's dtype; the trainable
adapters, token rows and discriminator heads (fp32) with their AdamW moments; and the activations,
gradients and temporaries of one `Trainer.train_step`, tracked tensor by tensor. The teacher's own
iteration (`teacher_pass_cost`) is also counted at each `--teacher-resolutions` size: what training
the teacher at another size than the student would change.
"""

from __future__ import annotations

import sys

from .meta_run import GB, teacher_pass_cost, train_cost

CUDA_OVERHEAD_GB = 1.0  # CUDA context (~0.5 GB) + allocator rounding and cuBLAS/cuDNN workspaces, on top of tensors


def bench_memory(models: tuple[str, ...] = ("sd", "sdxl"), presets: tuple[str, ...] = ("paper", "balanced", "lite"),
                 resolution: int = 512, teacher_resolutions: tuple[int, ...] = (), **overrides) -> dict:
    """Estimates per (model, preset) at `resolution`, and the teacher's own iteration per teacher resolution.

    Returns {"benchmark": "memory", "settings", "notes", "results": [train_cost rows + "peak_gb" and
    "with_overhead_gb"], "teacher": [teacher_pass_cost rows]}; bytes in bytes, GB decimal.
    Raises BenchError for an unknown model, ConfigError for an unknown preset or field in `overrides`.
    """
    results, teacher = [], []
    for model in models:
        for name in presets:
            print(f"[bench] memory: {model}, preset {name}, {resolution} px", file=sys.stderr, flush=True)
            row = train_cost(model, name, resolution, **overrides)
            row["peak_gb"] = row["peak_bytes"] / GB
            row["with_overhead_gb"] = row["peak_gb"] + CUDA_OVERHEAD_GB
            results.append(row)
        for size in teacher_resolutions:
            for name in presets:
                print(f"[bench] memory: {model}, teacher alone, preset {name}, {size} px", file=sys.stderr, flush=True)
                teacher.append(teacher_pass_cost(model, name, size))
    return {
        "benchmark": "memory",
        "settings": {"models": list(models), "presets": list(presets), "resolution": resolution,
                     "teacher_resolutions": list(teacher_resolutions), "overrides": overrides},
        "notes": ["estimates counted on the meta device, not measurements: see echodistill/benchmarks/meta_run.py "
                  "for what differs from a GPU run",
                  f"with_overhead_gb adds {CUDA_OVERHEAD_GB} GB for the CUDA context, allocator rounding and "
                  "library workspaces",
                  "offload is not simulated: the text encoders and the VAE are counted resident throughout"],
        "results": results,
        "teacher": teacher,
    }


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def memory_table(report: dict) -> str:
    from .speed import format_table

    rows = []
    for r in report["results"]:
        unets = sum(v["bytes"] for k, v in r["weights"].items() if k.endswith("unet"))
        others = r["frozen_bytes"] - unets
        rows.append([r["model"], r["preset"], r["weights_dtype"], str(r["batch_size"]), _gb(unets), _gb(others),
                     f"{r['trainable_parameters'] / 1e6:.1f}", _gb(r["trainable_bytes"] + r["optimizer_bytes"]),
                     _gb(r["activation_bytes"]), f"{r['peak_gb']:.2f}", f"{r['with_overhead_gb']:.2f}",
                     f"{r['flops_per_iteration'] / 1e12:.2f}"])
    title = (f"bench memory: estimated peak per training iteration at {report['settings']['resolution']} px "
             "(meta device count; GB = 1e9 bytes)")
    headers = ["model", "preset", "weights", "batch", "UNets GB", "text+VAE GB", "trained M", "trained+AdamW GB",
               "activations GB", "peak GB", "+CUDA GB", "TFLOP/it"]
    text = title + "\n" + format_table(headers, rows)
    if report["teacher"]:
        teacher_rows = [[t["model"], t["preset"], str(t["resolution"]), str(t["batch_size"]),
                         _gb(t["activation_bytes"]), _gb(t["peak_bytes"]), f"{t['flops_per_iteration'] / 1e12:.2f}"]
                        for t in report["teacher"]]
        text += "\n\nthe teacher's own iteration alone (denoising loss on the photos, its K/V and token rows)\n"
        text += format_table(["model", "preset", "px", "batch", "activations GB", "peak GB", "TFLOP/it"],
                             teacher_rows)
    return text
