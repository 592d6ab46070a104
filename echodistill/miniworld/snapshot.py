"""A compact, committable snapshot of a mini-world training run, to carry it to a fresh machine.

`scripts/train_miniworld.py` keeps its loop states in <log-dir>/ckpt/ (the teacher's is ~90 MB: weights,
AdamW moments, schedule, random generator), which stay on the machine that trained them. A snapshot keeps
what it takes to go on elsewhere, in safetensors files:

    vae.safetensors           the finished VAE (float32) and its scaling factor
    text_encoder.safetensors  the pretrained, frozen text encoder (float16: the written folders' precision)
    teacher.safetensors       the teacher UNet (float16) with the step it reached, its schedule position and
                              random generator; or the finished teacher
    student.safetensors       the finished one-step student (float16), once distilled

Restoring writes ckpt/vae.pt and either ckpt/teacher.pt (finished) or ckpt/teacher_running.pt, a loop state
at the saved step whose AdamW moments start afresh (they are two thirds of the 90 MB and rebuild within a few
hundred steps); the random generator and the learning-rate schedule go on where they were. So a restored run
is not bit-for-bit the uncut one: the weights were rounded to float16 once and the moments restarted. Each
snapshot records that in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import EchoDistillError
from ..models.tensor_files import atomic_save_safetensors, open_safetensors
from .architecture import build_text_encoder, build_unet, build_vae
from .training import TeacherSettings, save_atomically, teacher_optimizer

FILES = {"vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors", "teacher": "teacher.safetensors",
         "student": "student.safetensors"}
GENERATOR = "__generator_state__"  # the teacher loop's torch.Generator state, a uint8 tensor
CHECKPOINTS = ("vae.pt", "vae_running.pt", "teacher.pt", "teacher_running.pt", "student.pt", "student_pairs.pt",
               "student_running.pt")  # everything in ckpt/ a restored run would read or go on from


class SnapshotError(EchoDistillError):
    """A snapshot or checkpoint folder that cannot be saved or restored; the message says which file and why."""


def _read(path: Path, builder=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a snapshot file; SnapshotError in one line when it is missing, unreadable or (with
    `builder`, a model constructor) its tensors do not fit the model the recipe builds."""
    if not path.is_file():
        raise SnapshotError(f"{path}: missing from the snapshot; save it again with --save-snapshot")
    with open_safetensors(path, SnapshotError, advice="save the snapshot again with --save-snapshot") as file:
        tensors, metadata = {name: file.get_tensor(name) for name in file.keys()}, dict(file.metadata() or {})
    if builder is not None:
        weights = {name: t for name, t in tensors.items() if name != GENERATOR}
        try:
            builder().load_state_dict(_float(weights))
        except RuntimeError as error:
            first = str(error).strip().splitlines()[1:2] or [type(error).__name__]
            raise SnapshotError(f"{path}: its tensors do not fit the model this recipe builds ({first[0].strip()}); "
                                "save the snapshot again with --save-snapshot") from None
    return tensors, metadata


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def _field(metadata: dict[str, str], key: str, path: Path, kind=int):
    try:
        return kind(metadata[key])
    except (KeyError, ValueError):
        raise SnapshotError(f"{path}: its metadata has no readable {key!r}; save the snapshot again with "
                            "--save-snapshot") from None


def _check_seed(metadata: dict[str, str], path: Path, seed: int) -> None:
    saved = _field(metadata, "seed", path)
    if saved != seed:
        raise SnapshotError(f"{path} was saved from a run with --seed {saved}; this run's is {seed}: give "
                            f"--seed {saved} to go on with it")


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.half() if t.is_floating_point() else t for name, t in state.items()}


def _float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def load_checkpoint(path: Path) -> dict:
    """A run checkpoint (torch.load, weights only, on the CPU); SnapshotError naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is one line
        raise SnapshotError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


def save_snapshot(ckpt: Path, folder: Path, settings: TeacherSettings, seed: int) -> dict[str, str]:
    """Write the snapshot of the run whose checkpoints are in `ckpt` into `folder`; {part: what was saved}.

    Saves the VAE (ckpt/vae.pt), the teacher (ckpt/teacher.pt, else the loop state ckpt/teacher_running.pt)
    with its text encoder, and the student (ckpt/student.pt) where they exist, each with the run's `seed`;
    a part an earlier snapshot left in `folder` that this run has not reached is removed (it belonged to
    another run). Raises SnapshotError when there is nothing to save, a checkpoint is unreadable, or `folder`
    cannot hold the files.
    """
    ckpt, folder = Path(ckpt), Path(folder)
    finished = (ckpt / "teacher.pt").is_file()
    teacher_source = ckpt / ("teacher.pt" if finished else "teacher_running.pt")
    if not (ckpt / "vae.pt").is_file():
        raise SnapshotError(f"{ckpt}: no vae.pt to save (the VAE stage has not finished); every later stage "
                            "trains on its latents")
    if folder.exists() and not folder.is_dir():
        raise SnapshotError(f"{folder} is a file, not a folder; give the folder to write the snapshot into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SnapshotError(f"{folder}: cannot be made ({error.strerror or error}); give a folder you can write to")
    run = {"seed": str(seed), "steps": str(settings.steps)}
    parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    vae = load_checkpoint(ckpt / "vae.pt")
    parts["vae"] = (vae["state"], {**run, "scaling_factor": repr(float(vae["scaling_factor"]))})
    saved = {"vae": "finished"}
    if teacher_source.is_file():
        state = load_checkpoint(teacher_source)
        step = settings.steps if finished else int(state["step"])
        parts["text_encoder"] = (_half(state["text_encoder"]), {**run, "precision": "float16"})
        tensors = _half(state["unet"])
        if not finished:
            tensors[GENERATOR] = state["generator"]
        parts["teacher"] = (tensors, {**run, "step": str(step), "finished": json.dumps(finished),
                                      "precision": "float16",
                                      "moments": "not kept: AdamW restarts from zero on restore"})
        saved["teacher"] = "finished" if finished else f"step {step} of {settings.steps}"
        if finished and (ckpt / "student.pt").is_file():
            parts["student"] = (_half(load_checkpoint(ckpt / "student.pt")["unet"]), {**run, "precision": "float16"})
            saved["student"] = "finished"
    for part, (tensors, metadata) in parts.items():
        atomic_save_safetensors(tensors, folder / FILES[part], metadata)
    for part, name in FILES.items():  # an older snapshot's later parts: another run's, never to be restored
        if part not in parts:
            (folder / name).unlink(missing_ok=True)
    return saved


def restore_snapshot(folder: Path, ckpt: Path, settings: TeacherSettings, seed: int) -> dict[str, str]:
    """Write the checkpoints `folder`'s snapshot holds into `ckpt`; {part: what was restored}.

    Refuses (SnapshotError), before writing anything: a `ckpt` that already holds any checkpoint or progress
    file (a run on this machine is further along, or exact, and wins; another run's student progress would be
    resumed against this teacher); a snapshot of another seed or total of teacher steps than this run's; and
    files whose tensors do not fit the models the recipe builds.
    """
    folder, ckpt = Path(folder), Path(ckpt)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such folder; give the folder a snapshot was saved to")
    if not (folder / FILES["vae"]).is_file():
        raise SnapshotError(f"{folder}: no {FILES['vae']} in it; give the folder a snapshot was saved to")
    present = [name for name in CHECKPOINTS if (ckpt / name).is_file()]
    if present:
        raise SnapshotError(f"{ckpt} already holds {', '.join(present)}: this machine's own checkpoints go on from "
                            "there; restore into an empty --log-dir")
    vae_state, vae_metadata = _read(folder / FILES["vae"], build_vae)
    _check_seed(vae_metadata, folder / FILES["vae"], seed)
    writes = {"vae.pt": {"state": vae_state,
                         "scaling_factor": _field(vae_metadata, "scaling_factor", folder / FILES["vae"], float)}}
    restored = {"vae": "finished"}
    if (folder / FILES["teacher"]).is_file():
        path = folder / FILES["teacher"]
        tensors, metadata = _read(path, build_unet)
        _check_seed(metadata, path, seed)
        steps = _field(metadata, "steps", path)
        if steps != settings.steps:
            raise SnapshotError(f"{path} was saved from a {steps}-step teacher run; this run trains {settings.steps} "
                                "steps (a --quick run's snapshot restores only with --quick, and the reverse)")
        generator_state = tensors.pop(GENERATOR, None)
        unet_state = _float(tensors)
        text_tensors, text_metadata = _read(folder / FILES["text_encoder"], build_text_encoder)
        _check_seed(text_metadata, folder / FILES["text_encoder"], seed)
        text_state = _float(text_tensors)
        if _field(metadata, "finished", path, _flag):
            writes["teacher.pt"] = {"unet": unet_state, "text_encoder": text_state}
            restored["teacher"] = "finished"
        else:
            if generator_state is None:
                raise SnapshotError(f"{path}: a running teacher without its random generator's state; save the "
                                    "snapshot again with --save-snapshot")
            step = _field(metadata, "step", path)
            if not 1 <= step < settings.steps:
                raise SnapshotError(f"{path}: a running teacher at step {step} of {settings.steps}; save the snapshot "
                                    "again with --save-snapshot")
            unet, text_encoder = build_unet(), build_text_encoder()
            optimizer, scheduler = teacher_optimizer(unet, text_encoder, settings)
            for _ in range(step):  # the schedule's position: the learning rate after `step` steps
                optimizer.step()  # no gradients: a no-op on the weights, but the scheduler expects it first
                scheduler.step()
            writes["teacher_running.pt"] = {
                "step": step, "unet": unet_state, "text_encoder": text_state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator_state}
            restored["teacher"] = f"step {step} of {settings.steps} (AdamW moments restart)"
    if (folder / FILES["student"]).is_file():
        if restored.get("teacher") != "finished":
            raise SnapshotError(f"{folder}: a student without its finished teacher; the snapshot is incomplete")
        student, student_metadata = _read(folder / FILES["student"], build_unet)
        _check_seed(student_metadata, folder / FILES["student"], seed)
        writes["student.pt"] = {"unet": _float(student)}
        restored["student"] = "finished"
    for name, payload in writes.items():
        save_atomically(ckpt / name, payload)
    return restored
