"""A fleet worker: a Ray actor that loads the teacher/student pair once and trains concept after concept.

Each concept goes through `jobs.runs.train_concept` (its own `pristine` borrow of the pair, checkpoints
on the config's schedule, resume from the last one), so nothing is reloaded between concepts and a
concept restarted elsewhere continues exactly where the lost worker's last checkpoint left it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import ray

from ..errors import EchoDistillError
from ..models.tensor_files import atomic_write_text
from ..training.callbacks import Callbacks
from .manifest import ConceptJob, subject_of
from .state import PROGRESS_NAME


class _ProgressFile(Callbacks):
    """Writes the step reached to out/<name>/progress.json; the driver reads it for the bar and the state."""

    def __init__(self, path: Path, worker: str, pid: int):
        self.path, self.worker, self.pid = path, worker, pid

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        import json

        atomic_write_text(self.path, json.dumps({"step": step, "steps": total, "worker": self.worker,
                                                 "pid": self.pid, "time": time.time()}))


class FleetWorker:
    """One worker slot (a GPU, or some CPU threads): the pair stays loaded for every concept it trains."""

    def __init__(self, teacher: str, student: str, *, teacher_family: str = "auto", student_family: str = "auto",
                 dtype: str = "fp32", device: str = "cpu", threads: int | None = None):
        import torch

        from ..models.pair import load_model_pair

        if threads:
            torch.set_num_threads(threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.load_error: str | None = None  # the loader's own message: a raise here would reach the driver as
        try:                                # a bare "actor died", and Ray would retry a load that cannot work
            self.pair = load_model_pair(teacher, student, teacher_family=teacher_family,
                                        student_family=student_family, dtype=dtype, device=device)
        except EchoDistillError as exc:
            self.pair, self.load_error = None, str(exc)
        self.loads, self.jobs = 1, 0  # one pair load in this process, however many concepts it trains

    def identity(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "pair_loads": self.loads, "jobs": self.jobs,
                "error": self.load_error}

    def verify(self, bundle_path: str) -> str | None:
        """None when the finished bundle loads and fits this worker's base models, else why not."""
        from ..concepts.bundle import ConceptBundle

        try:
            ConceptBundle.load(bundle_path).check_base(self.pair)
        except EchoDistillError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def train(self, job: ConceptJob, run_dir: str) -> dict:
        """Train (or resume) one concept; the library's own errors come back as a failed record, not raised."""
        from ..jobs.runs import BUNDLE_NAME, train_concept
        from PIL import Image

        from ..miniworld import reference_images

        run_dir = Path(run_dir)
        started = time.perf_counter()
        self.jobs += 1
        record = {"worker": self.name, "pid": os.getpid(), "pair_loads": self.loads, "job_on_pair": self.jobs}
        try:
            subject = subject_of(job.photos)
            if subject is not None:  # drawn, not stored: the world's references with their grammar captions
                images = [Image.fromarray(array) for array in reference_images(subject)]
            else:
                images = job.photos
            result = train_concept(self.pair, images, job.config, run_dir=run_dir, captions=job.captions,
                                   callbacks=_ProgressFile(run_dir / PROGRESS_NAME, self.name, os.getpid()),
                                   resume=True, reuse_finished=False)
        except EchoDistillError as exc:  # bad photos, a bad value: the concept's own fault, retrying won't help
            return record | {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                             "wall_s": time.perf_counter() - started}
        return record | {"status": "done", "steps": result.bundle.step, "resumed_from": result.resumed_from,
                         "wall_s": time.perf_counter() - started, "bundle": str(run_dir / BUNDLE_NAME)}


def remote_worker(max_restarts: int, *, num_cpus: float, num_gpus: float):
    """The actor class with its resources; Ray restarts a lost one (a fresh process loads the pair again)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=0)(FleetWorker)
