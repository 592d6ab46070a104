"""Measuring for the benchmarks: device facts, timings, memory windows and FLOP counts.

See speed.py for what each speed benchmark compares and how its numbers are defined.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .names import DTYPE_NAMES, BenchError  # noqa: F401 - imported from here by every benchmark

try:
    import psutil
except ImportError:  # optional: CPU memory is then not measured
    psutil = None


# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets.
# Matched as a substring of torch.cuda.get_device_name(); the first match wins, so the more
# specific names come first ("GH200" before "H200", "H100 PCIe" before "H100").
PEAK_TFLOPS: dict[str, float] = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,  # fp16/bf16 with fp32 accumulate, which is how PyTorch runs them
}
PEAK_BASIS = "dense fp16/bf16 tensor-core peak (fp32 runs cannot reach it)"
PROJECTED_ITERATIONS = 1000  # the paper's iterations per concept


# --- device facts --------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    return f"CPU {model or 'unknown'} ({torch.get_num_threads()} torch threads)"


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def check_device(device: str) -> torch.device:
    """`device` as a torch.device benchmarks can run on; BenchError naming it otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise BenchError(f"--device {device!r} is not a device: write cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {str(device)!r} asked for, but CUDA is not available here: pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"device {str(device)!r} is not supported: use cpu or cuda")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: torch.device) -> None:
    """Free what earlier cases left, so the next window's growth is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas; give them back to the OS


# --- measuring -----------------------------------------------------------------------------------

class MemoryProbe:
    """Peak memory over a `with` window: CUDA allocator statistics, or sampled CPU RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.start = self.peak = None
        self._stop, self._thread, self._process = threading.Event(), None, None

    @staticmethod
    def method(device: torch.device) -> str | None:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        return "psutil RSS sampled every 5 ms" if psutil is not None else None

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        elif psutil is not None:
            self._process = psutil.Process()
            self.start = self.peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)

    def summary(self) -> dict[str, float | None]:
        if self.start is None:
            return {"peak_mb": None, "growth_mb": None}
        return {"peak_mb": self.peak / 2**20, "growth_mb": (self.peak - self.start) / 2**20}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts SDPA only through its CUDA kernels; the CPU flash kernels get the same formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Measurement:
    times_s: list[float]
    memory: dict[str, float | None]
    flops: int

    def p(self, q: float) -> float:
        return float(np.percentile(self.times_s, q))


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(
    setups: dict[str, Callable[[], Callable[[], object]]], device: torch.device, warmup: int, repeats: int
) -> dict[str, Measurement]:
    """Build each case with its `setup()`, warm it up, then time all cases interleaved; count FLOPs.

    Memory is measured over each case's setup + warm-up calls (at least one call, so a case with
    warmup = 0 still has a memory window and allocates its lazy state before timing). Timed calls
    alternate between the cases in ABBA order, so a background load that comes and goes lands
    on all of them rather than on whichever ran last.
    """
    fns, memory = {}, {}
    for name, setup in setups.items():
        _release_memory(device)
        with MemoryProbe(device) as probe:
            fns[name] = setup()
            for _ in range(max(warmup, 1)):
                fns[name]()
        memory[name] = probe.summary()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for index in range(repeats):
        for name in list(fns) if index % 2 == 0 else list(fns)[::-1]:
            times[name].append(_timed_call(fns[name], device))
    return {name: Measurement(times[name], memory[name], count_flops(fns[name])) for name in fns}


def ratio(ours: float | None, peer: float | None) -> float | None:
    return None if ours is None or not peer else ours / peer


def rates(m: Measurement, per_call: str, peak: float | None) -> dict:
    """Seconds or milliseconds per call, memory, FLOPs and throughput of one measured case."""
    scale, unit = (1e3, "ms") if per_call == "latency" else (1.0, "s")
    tflops = m.flops / m.p(50) / 1e12
    return {
        f"{per_call}_{unit}": {"p50": m.p(50) * scale, "p95": m.p(95) * scale, "all": [t * scale for t in m.times_s]},
        "memory": m.memory,
        "flops": m.flops,
        "tflops_per_s": tflops,
        "utilisation_pct": None if peak is None else 100.0 * tflops / peak,
    }
