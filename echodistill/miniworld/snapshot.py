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
from .architecture import build_text_encoder, build_unet
from .training import TeacherSettings, save_atomically, teacher_optimizer

FILES = {"vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors", "teacher": "teacher.safetensors",
         "student": "student.safetensors"}
GENERATOR = "__generator_state__"  # the teacher loop's torch.Generator state, a uint8 tensor


class SnapshotError(EchoDistillError):
    """A snapshot or checkpoint folder that cannot be saved or restored; the message says which file and why."""


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_save_safetensors(tensors, path, metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a snapshot file; SnapshotError in one line when it is missing or unreadable."""
    if not path.is_file():
        raise SnapshotError(f"{path}: missing from the snapshot; save it again with --save-snapshot")
    with open_safetensors(path, SnapshotError, advice="save the snapshot again with --save-snapshot") as file:
        return {name: file.get_tensor(name) for name in file.keys()}, dict(file.metadata() or {})


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.half() if t.is_floating_point() else t for name, t in state.items()}


def _float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is one line
        raise SnapshotError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


def save_snapshot(ckpt: Path, folder: Path, settings: TeacherSettings) -> dict[str, str]:
    """Write the snapshot of the run whose checkpoints are in `ckpt` into `folder`; {part: what was saved}.

    Saves the VAE (ckpt/vae.pt), the teacher (ckpt/teacher.pt, else the loop state ckpt/teacher_running.pt)
    with its text encoder, and the student (ckpt/student.pt) where they exist. Raises SnapshotError when
    there is nothing to save or a checkpoint is unreadable.
    """
    ckpt, folder = Path(ckpt), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    if (ckpt / "vae.pt").is_file():
        vae = _load(ckpt / "vae.pt")
        _write(folder / FILES["vae"], vae["state"], {"scaling_factor": repr(float(vae["scaling_factor"]))})
        saved["vae"] = "finished"
    finished = (ckpt / "teacher.pt").is_file()
    source = ckpt / ("teacher.pt" if finished else "teacher_running.pt")
    if source.is_file():
        state = _load(source)
        step = settings.steps if finished else int(state["step"])
        _write(folder / FILES["text_encoder"], _half(state["text_encoder"]), {"precision": "float16"})
        tensors = _half(state["unet"])
        metadata = {"step": str(step), "steps": str(settings.steps), "finished": json.dumps(finished),
                    "precision": "float16", "moments": "not kept: AdamW restarts from zero on restore"}
        if not finished:
            tensors[GENERATOR] = state["generator"]
        _write(folder / FILES["teacher"], tensors, metadata)
        saved["teacher"] = "finished" if finished else f"step {step} of {settings.steps}"
    if (ckpt / "student.pt").is_file():
        _write(folder / FILES["student"], _half(_load(ckpt / "student.pt")["unet"]), {"precision": "float16"})
        saved["student"] = "finished"
    if not saved:
        raise SnapshotError(f"{ckpt}: no vae.pt, teacher.pt, teacher_running.pt or student.pt to save")
    return saved


def restore_snapshot(folder: Path, ckpt: Path, settings: TeacherSettings) -> dict[str, str]:
    """Write the checkpoints `folder`'s snapshot holds into `ckpt`; {part: what was restored}.

    Refuses (SnapshotError) to replace a checkpoint `ckpt` already has: a run on this machine is further
    along, or exact, and wins. A teacher snapshot saved at another total of steps than `settings.steps`
    is refused too (its schedule would not fit). Every file is read and checked before one is written.
    """
    folder, ckpt = Path(folder), Path(ckpt)
    if not (folder / FILES["vae"]).is_file():
        raise SnapshotError(f"{folder}: no {FILES['vae']} in it; give the folder a snapshot was saved to")
    present = [name for name in ("vae.pt", "teacher.pt", "teacher_running.pt", "student.pt") if (ckpt / name).is_file()]
    if present:
        raise SnapshotError(f"{ckpt} already holds {', '.join(present)}: this machine's own checkpoints go on from "
                            "there; restore into an empty --log-dir")
    vae_state, vae_metadata = _read(folder / FILES["vae"])
    writes = {"vae.pt": {"state": vae_state, "scaling_factor": float(vae_metadata["scaling_factor"])}}
    restored = {"vae": "finished"}
    if (folder / FILES["teacher"]).is_file():
        tensors, metadata = _read(folder / FILES["teacher"])
        if int(metadata["steps"]) != settings.steps:
            raise SnapshotError(f"{folder / FILES['teacher']} was saved from a {metadata['steps']}-step teacher run; "
                                f"this recipe trains {settings.steps} steps")
        generator_state = tensors.pop(GENERATOR, None)
        unet_state = _float(tensors)
        text_state = _float(_read(folder / FILES["text_encoder"])[0])
        if json.loads(metadata["finished"]):
            writes["teacher.pt"] = {"unet": unet_state, "text_encoder": text_state}
            restored["teacher"] = "finished"
        else:
            step = int(metadata["step"])
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
        writes["student.pt"] = {"unet": _float(_read(folder / FILES["student"])[0])}
        restored["student"] = "finished"
    for name, payload in writes.items():
        save_atomically(ckpt / name, payload)
    return restored
