"""Run a manifest on Ray: a local cluster by default, an existing one with `address`.

One actor per worker slot holds the loaded pair; the driver hands each idle actor the next queued
concept and waits on the results with `ray.wait`. Ray owns the faults: an actor whose process dies is
restarted by Ray (`max_restarts`), and the concept it was training comes back here as a
`RayActorError` and is queued again; whichever worker takes it resumes from its last checkpoint under
`out`. A concept that fails for its own reason (a DataError, a ConfigError) is recorded and not retried.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from ..concepts.bundle import ConceptBundle
from ..errors import EchoDistillError
from ..jobs.runs import BUNDLE_NAME
from ..training.config import FIELDS_ADDED_LATER
from .manifest import ConceptJob, Manifest
from .state import PROGRESS_NAME, FleetState, read_progress
from .worker import remote_worker

WATCHING = {"sample_every", "save_every", "log_every"}  # how a run is watched, not what it computes
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding echodistill/


class FleetError(EchoDistillError):
    """The fleet cannot train at all: no worker could load the base models."""


class FleetWarning(UserWarning):
    """Something the fleet worked around (a worker that could not load the models was stopped)."""


class FleetTimeout(EchoDistillError):
    """The fleet did not finish within its time limit; the state file says where each concept stands."""


@dataclass
class FleetOptions:
    workers: int | None = None  # default: one per GPU in the cluster, else 1
    device: str = "auto"  # auto: cuda when the cluster has GPUs
    threads: int | None = None  # torch CPU threads per worker (CPU slots)
    max_attempts: int = 3  # tries per concept when workers are lost (its own errors are never retried)
    poll_s: float = 0.2
    timeout_s: float | None = None  # the whole run; None: no limit


def start_ray(address: str | None = None, **init_options) -> bool:
    """Join `address`, or start a local cluster; True when this call started (and should stop) it.

    A local cluster's workers import this package from where the driver does (PYTHONPATH), so a
    checkout runs without being installed; a cluster's nodes need the package installed.
    """
    if ray.is_initialized():
        return False
    if address is None:
        paths = [str(PACKAGE_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        init_options.setdefault("include_dashboard", False)
    # "local": a cluster of our own, never one that `ray start` left running on this machine
    ray.init(address=address or "local", log_to_driver=False, **init_options)
    return True


def stop_ray() -> None:
    ray.shutdown()


def bundle_is_finished(job: ConceptJob, path: Path) -> bool:
    """The bundle loads, reached the config's steps, and was trained with this config (watching aside)."""
    if not path.is_file():
        return False
    try:
        bundle = ConceptBundle.load(path)
    except EchoDistillError:
        return False
    wanted = {k: v for k, v in job.config.to_dict().items() if k not in WATCHING}
    saved = {k: v for k, v in {**FIELDS_ADDED_LATER, **bundle.config}.items() if k not in WATCHING}
    return bundle.step == job.config.steps and saved == wanted


def run_fleet(manifest: Manifest, out: str | Path, options: FleetOptions | None = None, *,
              on_event: Callable[[str, dict], None] | None = None, progress_bar: bool = True) -> FleetState:
    """Train every concept of `manifest` under `out`; returns the final state (also in out/fleet-state.json).

    `on_event(name, record)` is called whenever the driver updates a concept's record (tests and
    front ends watch progress with it). Needs `ray.init` done, or calls `start_ray()` itself.
    """
    options = options or FleetOptions()
    out = Path(out).resolve()  # the state names bundles by absolute path: a report from any folder finds them
    out.mkdir(parents=True, exist_ok=True)
    started_here = start_ray()
    state = FleetState.load_or_new(out, str(manifest.path))
    notify = on_event or (lambda name, record: None)

    queue: deque[ConceptJob] = deque()
    finished: list[ConceptJob] = []  # their bundles load, at the config's steps: a worker checks the base models
    for job in manifest.concepts:
        bundle = out / job.name / BUNDLE_NAME
        if bundle_is_finished(job, bundle):
            finished.append(job)
            state.update(job.name, status="verifying", step=job.config.steps, steps=job.config.steps,
                         bundle=str(bundle), error=None, note=None)
        else:
            queue.append(job)
            state.update(job.name, status="queued", steps=job.config.steps, step=0, attempts=0, error=None,
                         bundle=None, worker=None, wall_s=None, note=None)
        state.update(job.name, subject=job.subject)
    state.save()

    total_steps = sum(job.config.steps for job in manifest.concepts)
    done_steps = sum(job.config.steps for job in finished)
    bar = _bar(total_steps, done_steps, progress_bar)
    try:
        if queue or finished:
            _drive(manifest, out, options, state, queue, finished, bar, notify)
    finally:
        bar.close()
        state.save()
        if started_here:
            ray.shutdown()
    return state


def _drive(manifest, out, options, state, queue, finished, bar, notify) -> None:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = options.device == "cuda" or (options.device == "auto" and gpus > 0)
    count = options.workers or (gpus if use_gpu else 1)
    count = max(1, min(count, len(queue) + len(finished)))
    threads = options.threads or (None if use_gpu else 1)
    Worker = remote_worker(options.max_attempts, num_cpus=1 if use_gpu else (threads or 1),
                           num_gpus=1 if use_gpu else 0)
    teacher, student = manifest.model_paths()
    actors = [Worker.remote(str(teacher), str(student), teacher_family=manifest.teacher_family,
                            student_family=manifest.student_family, dtype=manifest.dtype,
                            device="cuda" if use_gpu else "cpu", threads=threads) for _ in range(count)]
    deadline = None if options.timeout_s is None else time.monotonic() + options.timeout_s
    try:
        try:
            actors = _loaded(actors, options.timeout_s)
        except FleetError as exc:  # said in the state too: `fleet status` must not show them queued forever
            for job in queue:
                notify(job.name, state.update(job.name, status="failed", error=str(exc)))
            raise
        idle, running, probing = deque(range(len(actors))), {}, {}
        _verify(actors, out, state, finished, queue, notify, options.timeout_s)
        while queue or running:
            dispatched = bool(queue and idle)
            while queue and idle:
                slot, job = idle.popleft(), queue.popleft()
                (out / job.name / PROGRESS_NAME).unlink(missing_ok=True)  # a previous attempt's step is not this one's
                record = state.update(job.name, status="training", attempts=state.concepts[job.name]["attempts"] + 1,
                                      started=time.time())
                running[actors[slot].train.remote(job, str(out / job.name))] = (slot, job)
                notify(job.name, record)
            if not running and not probing:
                for job in queue:  # every worker is gone for good
                    notify(job.name, state.update(job.name, status="failed", error="no worker left to train it"))
                queue.clear()
                break
            ready, _ = ray.wait([*running, *probing], num_returns=1, timeout=options.poll_s)
            changed = _read_progress(out, state, running, bar, notify) or bool(ready) or dispatched
            for ref in ready:
                if ref in probing:
                    _probe(ref, probing, actors, idle, options.poll_s)
                    continue
                slot, job = running.pop(ref)
                lost = _settle(ref, job, state, options.max_attempts)
                notify(job.name, state.concepts[job.name])
                if lost and state.concepts[job.name]["status"] == "queued":
                    queue.appendleft(job)  # to whichever worker is free first: a live one, or this one restarted
                if lost:  # Ray is restarting it: it takes work again once it answers
                    probing[actors[slot].identity.remote()] = slot
                else:
                    idle.append(slot)
                bar.n = _steps_done(state)
                bar.refresh()
            if changed:
                state.save()
            if deadline is not None and time.monotonic() > deadline:
                raise FleetTimeout(f"the fleet ran past {options.timeout_s:.0f} s; see {state.path}")
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _loaded(actors: list, timeout_s: float | None) -> list:
    """The workers whose base models loaded; the others are stopped, with a FleetWarning naming why.

    Raises FleetError with the loader's own message (a missing file, a wrong family) when none loaded.
    """
    problems, alive = [], []
    for actor, ref in [(actor, actor.identity.remote()) for actor in actors]:
        try:
            answer = ray.get(ref, timeout=timeout_s)
        except (RayActorError, GetTimeoutError) as exc:  # killed while loading (out of memory), or stuck
            answer = {"error": str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}
        if answer.get("error"):
            problems.append(answer["error"])
            ray.kill(actor, no_restart=True)
        else:
            alive.append(actor)
    if not alive:
        raise FleetError(f"no worker could load the base models: {problems[0]}")
    if problems:
        warnings.warn(f"{len(problems)} of {len(actors)} workers could not load the base models and were stopped "
                      f"(the others train every concept): {problems[0]}", FleetWarning, stacklevel=2)
    return alive


def _verify(actors, out: Path, state: FleetState, finished: list, queue: deque, notify, timeout_s) -> None:
    """Skip a finished concept only once a worker has applied its bundle's check to the loaded base models."""
    checks = {actors[i % len(actors)].verify.remote(str(out / job.name / BUNDLE_NAME)): job
              for i, job in enumerate(finished)}
    for ref, job in checks.items():
        try:
            problem = ray.get(ref, timeout=timeout_s or 600)
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            problem = f"could not be verified: {exc}"
        if problem is None:
            notify(job.name, state.update(job.name, status="skipped"))
            continue
        queue.append(job)  # trained again (from its checkpoint, where one fits these models)
        notify(job.name, state.update(job.name, status="queued", step=0, attempts=0, bundle=None, note=problem))
    state.save()


def _probe(ref, probing: dict, actors: list, idle: deque, pause_s: float) -> None:
    """A restarting actor answered, or not yet (ask again), or is gone for good (Ray gave up restarting it)."""
    slot = probing.pop(ref)
    try:
        ray.get(ref, timeout=60)
    except ActorUnavailableError:
        time.sleep(pause_s)
        probing[actors[slot].identity.remote()] = slot
    except (RayActorError, GetTimeoutError):
        return
    else:
        idle.append(slot)


def _settle(ref, job: ConceptJob, state: FleetState, max_attempts: int) -> bool:
    """Record a finished task; True when its worker was lost (the concept is queued again if tries are left)."""
    record = state.concepts[job.name]
    try:
        result = ray.get(ref, timeout=60)
    except RayActorError as exc:
        if record["attempts"] < max_attempts:
            state.update(job.name, status="queued", error=None, lost=record.get("lost", 0) + 1)
        else:
            state.update(job.name, status="failed", error=f"worker lost {record['attempts']} times: {exc}")
        return True
    except (RayTaskError, GetTimeoutError) as exc:  # a bug, not the concept's photos: reported, not retried
        state.update(job.name, status="failed", error=str(exc).strip().splitlines()[-1])
        return False
    state.update(job.name, **result)
    if result["status"] == "done":
        state.update(job.name, step=result["steps"], error=None)
    return False


def _read_progress(out: Path, state: FleetState, running: dict, bar, notify) -> bool:
    """Fold the workers' progress notes into the state and the bar; True when a step moved."""
    changed = False
    for _, job in running.values():
        progress = read_progress(out / job.name)
        record = state.concepts[job.name]
        if progress and record["status"] == "training" and progress["step"] != record.get("step"):
            notify(job.name, state.update(job.name, step=progress["step"], worker=progress["worker"],
                                          pid=progress["pid"]))
            changed = True
    if changed:
        bar.n = _steps_done(state)
        bar.refresh()
    return changed


def _steps_done(state: FleetState) -> int:
    return sum(r.get("steps", 0) if r.get("status") in ("done", "skipped") else r.get("step", 0) or 0
               for r in state.concepts.values())


def _bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="fleet", unit="step", dynamic_ncols=True, disable=not enabled)
