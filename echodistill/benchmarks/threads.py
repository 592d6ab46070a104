"""CPU threads under load: the demo's training step with 1 thread, with the chosen count and with
torch's default, on an idle CPU and beside busy processes (`echodistill bench threads`).

The background load is plain Python processes spinning (`while True: pass`), started here and
stopped here by their own ids. Times are wall seconds per step (after one warm-up step) and the
process's CPU seconds per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..miniworld import CONCEPTS, STUDENT_DIR, TEACHER_DIR
from ..miniworld.recipe import tuned_config
from ..miniworld.scoring import UnitInputs
from ..models.pair import load_model_pair
from ..training.threads import available_cores, cpu_threads_for
from ..training.trainer import Trainer


@contextmanager
def busy_processes(count: int):
    """`count` spinning Python processes for the duration of the block."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0.0)  # let them reach the scheduler
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()


def demo_trainer(run_dir: Path, seed: int = 0) -> Trainer:
    """The demo's trainer (shipped mini world, its tuned config) without its sampling and scoring."""
    concept = CONCEPTS[sorted(CONCEPTS)[0]]
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    unit = UnitInputs.build(concept, seed, images_per_prompt=1, captions=True)
    config = tuned_config(concept.class_word, 1000, seed).with_changes(sample_every=0, save_every=0)
    return Trainer(pair, unit.images, config, run_dir=run_dir)


def time_steps(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(wall s / step, CPU s / step) over `steps` steps after one warm-up step."""
    trainer.train_step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def thread_benchmark(steps: int = 4, loads: tuple[int, ...] = (0, 1), threads: tuple[int, ...] | None = None) -> dict:
    """Per (threads, busy processes): wall and CPU seconds per demo training step."""
    cores = available_cores()
    default = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        trainer = demo_trainer(Path(folder))
        parameters = sum(p.numel() for p in trainer.pair.student.unet.parameters())
        chosen = cpu_threads_for(parameters, cores=cores, load=0.0)
        counts = threads or tuple(dict.fromkeys((1, chosen, cores)))
        rows = []
        for load in loads:
            with busy_processes(load):
                for count in counts:
                    torch.set_num_threads(count)
                    wall, cpu = time_steps(trainer, steps)
                    rows.append({"threads": count, "busy_processes": load, "wall_s_per_step": wall,
                                 "cpu_s_per_step": cpu})
    torch.set_num_threads(default)
    return {"cores": cores, "torch_default_threads": default, "chosen_threads": chosen,
            "student_unet_parameters": parameters, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "steps": steps, "rows": rows}


def thread_table(report: dict) -> str:
    by_load: dict[int, dict[int, float]] = {}
    for row in report["rows"]:
        by_load.setdefault(row["busy_processes"], {})[row["threads"]] = row["wall_s_per_step"]
    lines = [f"demo training step, {report['cores']} cores, OMP_WAIT_POLICY={report['omp_wait_policy']}, "
             f"chosen threads {report['chosen_threads']} ({report['student_unet_parameters'] / 1e6:.1f} M UNet parameters)",
             "| busy processes | threads | wall s/step | CPU s/step | wall vs 1 thread |", "|--:|--:|--:|--:|--:|"]
    for row in report["rows"]:
        one = by_load[row["busy_processes"]].get(1)
        ratio = f"{row['wall_s_per_step'] / one:.2f}x" if one else "-"
        lines.append(f"| {row['busy_processes']} | {row['threads']} | {row['wall_s_per_step']:.3f} | "
                     f"{row['cpu_s_per_step']:.3f} | {ratio} |")
    return "\n".join(lines)
