"""CPU threads for training: chosen per model size, so a busy CPU slows training gracefully.

torch starts one OpenMP thread per core. For small models (the mini world, the tiny test models)
each op is too small to split: the threads mostly wait for each other, and beside any other busy
process a spinning OpenMP team is descheduled mid-op and every op waits for the slowest thread.
Measured on the mini world (8 steps, whole process): idle, 2 threads took 1.06x the wall time of 1
and 1.33x its CPU; beside one busy process, 1.61x the wall time (26.4 s vs 4.8 s per step in a
loaded ComfyUI). So:

- below SMALL_MODEL_PARAMETERS UNet parameters: 1 thread;
- above: the cores not already busy (cores minus the 1-minute load average, at least 1).

OpenMP's wait policy is read once, when torch's OpenMP runtime starts: the command line sets
``OMP_WAIT_POLICY=PASSIVE`` before it imports torch (idle threads sleep rather than spin).
Inside ComfyUI torch is already running, so only the thread count applies there.

An explicit choice always wins: ``set_cpu_threads(n)`` (the commands' ``--threads``), or the
environment variable ``ECHODISTILL_THREADS``; ``OMP_NUM_THREADS`` set by the user is respected too.
"""

from __future__ import annotations

import os

import torch

SMALL_MODEL_PARAMETERS = 50_000_000  # the mini world's UNets are ~2-10 M; SD's is 865 M
ENV = "ECHODISTILL_THREADS"
_explicit: int | None = None


def passive_openmp_wait() -> None:
    """Ask OpenMP for sleeping (not spinning) idle threads; effective only before torch starts OpenMP."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_cpu_threads(threads: int) -> None:
    """An explicit thread count: used now, and kept by `configure_cpu_threads`."""
    global _explicit
    if threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    _explicit = threads
    torch.set_num_threads(threads)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads_for(parameters: int, *, cores: int | None = None, load: float | None = None) -> int:
    """The thread count for training a UNet of `parameters` on `cores` cores at 1-minute `load`."""
    cores = cores or available_cores()
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def configure_cpu_threads(unet: torch.nn.Module, device: torch.device | str) -> int | None:
    """Set torch's CPU threads for training `unet` on `device` (nothing on a GPU); returns the count set,
    or None where nothing changed (GPU, or the user chose)."""
    if torch.device(device).type != "cpu":
        return None
    if _explicit is not None:
        return None
    chosen = os.environ.get(ENV, "").strip()
    if chosen:
        try:
            threads = int(chosen)
        except ValueError:
            threads = 0
        if threads >= 1:
            torch.set_num_threads(threads)
            return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = cpu_threads_for(sum(p.numel() for p in unet.parameters()))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
