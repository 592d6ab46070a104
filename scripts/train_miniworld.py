#!/usr/bin/env python
"""Train the mini world's shipped models from one seed, on a CPU (or a CUDA GPU with --device cuda).

    nice -n 10 .venv/bin/python scripts/train_miniworld.py --seed 0

Stages (each logged to runs/miniworld/<stage>.log and, all together, to train.log):
  1. render   — the training scenes and their captions (grammar.py, render.py)
  2. vae      — AutoencoderKL, 64×64 pixels <-> 16×16×4 latents; scaling factor from the latents
  3. teacher  — CLIP text encoder pretrained to read the captions' attributes, then frozen (as SD's
                CLIP is) under an ε-prediction UNet (training.py says why, and why offset noise)
  4. student  — a copy of the teacher distilled to one step at t = 999 (training.py explains how)
  5. write    — fp16 diffusers folders into echodistill/assets/miniworld/models/{teacher,student}
  6. oracle   — attribute reader and subject encoder into echodistill/assets/miniworld/oracle/
  7. image_prompt — the zero-training image-prompt adapter (image_prompt.py), trained once on the
                procedural subjects through the written teacher, into echodistill/assets/miniworld/image_prompt/
  8. eval     — load both folders with load_model_pair, sample through echodistill.sampling,
                score with the oracle; numbers in runs/miniworld/eval.json, pictures beside them
Intermediate results are kept in runs/miniworld/ckpt/, so `--from-stage write` redoes only the
later stages, and `--to-stage teacher` stops after the teacher. A run cut off (a session ending, Ctrl-C)
goes on when started again with the same command: the VAE, teacher and student stages finished in ckpt/
are kept, and every training loop (VAE, teacher, student, oracles, image-prompt adapter; not the text
encoder's minutes-long pretraining) and the student's teacher pairs go on from their saved state. A finished
training stage is never trained again by accident: a `--from-stage` at or before it is refused until its
checkpoint is removed, and so is a run whose checkpoints cannot be read or were trained with another seed. With `--device cuda` the VAE, text
encoder, teacher and student train on the GPU from the same random draws as on the CPU (training.py),
and their checkpoints resume on either. `--quick` shrinks every stage to seconds, to check the script end to end (it writes
into runs/miniworld/quick/ instead of the package).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from echodistill.miniworld import architecture as arch  # noqa: E402
from echodistill.miniworld.concepts import CONCEPTS, TOKEN_PLACEHOLDER, evaluation_prompts, reference_images  # noqa: E402
from echodistill.miniworld.data import render_set  # noqa: E402
from echodistill.miniworld.evaluate import image_grid, prompt_fidelity_report, vae_ceiling  # noqa: E402
from echodistill.miniworld.grammar import Caption  # noqa: E402
from echodistill.miniworld.image_prompt import ImagePromptSettings, adapter_path, train_image_prompt  # noqa: E402
from echodistill.miniworld.oracle import Oracle, OracleError  # noqa: E402
from echodistill.miniworld.snapshot import SnapshotError, load_checkpoint, restore_snapshot, save_snapshot  # noqa: E402
from echodistill.miniworld.oracle_train import (  # noqa: E402
    OracleSettings,
    generalization_report,
    subject_views,
    train_oracles,
)
from echodistill.miniworld.training import (  # noqa: E402
    StudentSettings,
    TeacherSettings,
    TextSettings,
    VaeSettings,
    distill_student,
    encode_latents,
    pretrain_text_encoder,
    reconstruction_psnr,
    save_atomically,
    set_scaling_factor,
    stated_labels,
    teacher_pairs,
    train_teacher,
    train_vae,
)
from echodistill.models.diffusion import encode_prompts  # noqa: E402
from echodistill.models.families import CONFIG_ROOT, family_config  # noqa: E402
from echodistill.models.pair import load_model_pair  # noqa: E402
from echodistill.models.tensor_files import atomic_write_text  # noqa: E402
from echodistill.models.tokenizer import load_clip_tokenizer  # noqa: E402
from echodistill.sampling.samplers import sample_student  # noqa: E402

STAGES = ("render", "vae", "teacher", "student", "write", "oracle", "image_prompt", "eval")
# The student stage's resumable progress in ckpt/: the teacher's pairs so far, the distillation loop state.
STUDENT_PROGRESS = ("student_pairs.pt", "student_running.pt")
# What each training stage leaves in ckpt/ when it has finished (a run started again keeps it).
FINISHED = {"vae": "vae.pt", "teacher": "teacher.pt", "student": "student.pt"}


@dataclass(frozen=True)
class RunSettings:
    train_images: int = 24000
    vae: VaeSettings = field(default_factory=VaeSettings)
    text: TextSettings = field(default_factory=TextSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    student: StudentSettings = field(default_factory=StudentSettings)
    oracle: OracleSettings = field(default_factory=OracleSettings)
    image_prompt: ImagePromptSettings = field(default_factory=ImagePromptSettings)
    eval_prompts: int = 300


# Sized for several hours on one 2-core CPU (docs/miniworld.md gives the measured time).
FULL = RunSettings(
    train_images=40000,
    vae=VaeSettings(steps=12000, full_steps=1000),  # at 1500 steps the round trip lost the subjects' detail
    teacher=TeacherSettings(steps=12000, batch=64, text_lr=0.0),  # 8,000 steps: shape read back 0.78 at 6,400
    student=StudentSettings(pairs=6144, pair_steps=8, steps=1500, batch=64),
    # docs/quality.md: 5,000 random-batch steps give own 0.90, other 0.43 / 0.68 worst; 1,500 more on subjects beside
    # their outline twins: own 0.89, other 0.41 / 0.59. Tried and not kept: negative_weight=1.0 (other 0.45 / 0.79
    # at 2,800 of 6,000 steps), hard_steps=1500 of look-alike batches (other 0.42 / 0.64, own 0.88) and 1,000 more
    # twin steps with hardest_weight=1 / 5 (other 0.41 / 0.54 and 0.37 / 0.55; own 0.87 and 0.81, the lowest 0.70).
    oracle=OracleSettings(images=24000, reader_steps=1500, subjects=16000, views=4, steps=5000, subjects_per_batch=64,
                          twin_steps=1500),
)
QUICK = RunSettings(
    train_images=512,
    vae=VaeSettings(steps=4, batch=8, full_steps=2),
    text=TextSettings(steps=4, batch=8),
    teacher=TeacherSettings(steps=4, batch=8, warmup=2),
    student=StudentSettings(pairs=16, pair_steps=2, pair_batch=8, steps=4, batch=8, warmup=2),
    oracle=OracleSettings(images=256, reader_steps=4, reader_batch=8, subjects=16, views=2, steps=4,
                          subjects_per_batch=4),
    image_prompt=ImagePromptSettings(pairs=32, steps=4, batch=8, warmup=2),
    eval_prompts=8,
)


class RunLog:
    """Timestamped lines to runs/miniworld/<stage>.log and train.log, flushed as they come."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.start = time.time()
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.start:7.0f}s] {message}"
        for name in dict.fromkeys((f"{stage}.log", "train.log")):  # once when the stage is "train"
            with open(self.folder / name, "a") as handle:
                handle.write(line + "\n")
        print(line, flush=True)

    def stage(self, stage: str):
        return lambda message: self(stage, message)


def hardware(device: str = "cpu") -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            **({"gpu": torch.cuda.get_device_name()} if device == "cuda" else {})}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def save_png(array: np.ndarray, path: Path, scale: int = 2) -> None:
    image = Image.fromarray(array)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared 2-core machine a second OpenMP thread waits on a busy
    # core at every op, and steps measured 2-15x slower than with one.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=2, help="processes rendering scenes")
    parser.add_argument("--log-dir", type=Path, default=REPO / "runs" / "miniworld",
                        help="folder for the logs, ckpt/ (the checkpoints a run goes on from) and eval.json "
                             "(default: runs/miniworld in the repository)")
    parser.add_argument("--from-stage", choices=STAGES,
                        help="redo this stage and the later ones, reading earlier results from <log-dir>/ckpt "
                             "(default: go on from the first training stage not finished there; a finished "
                             "vae, teacher or student stage is refused: remove its checkpoint to train it again)")
    parser.add_argument("--to-stage", choices=STAGES[1:], default=STAGES[-1],
                        help="stop after this stage (its results are in <log-dir>/ckpt or the written folders)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the VAE, text encoder, teacher and student train (the rest runs on the CPU)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run into <log-dir>/quick")
    parser.add_argument("--models-to", type=Path, help="write the teacher/student folders here instead of the package")
    parser.add_argument("--oracle-to", type=Path, help="write (and evaluate with) the oracle here instead of the package")
    parser.add_argument("--keep-oracle", action="store_true", help="skip the oracle stage; evaluate with the shipped oracle")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--eval-only", action="store_true",
                       help="only score the models in --models-to (default: the package's) with the oracle")
    modes.add_argument("--image-prompt-only", action="store_true",
                       help="only train the zero-training image-prompt adapter on the models in --models-to "
                            "(default: the package's); written beside the oracle")
    modes.add_argument("--oracle-only", action="store_true",
                       help="train only the oracles (they need no other stage), e.g. in a second process")
    modes.add_argument("--save-snapshot", type=folder_argument, metavar="DIR",
                       help="write a compact snapshot of <log-dir>/ckpt (VAE, teacher so far, student) into DIR, to "
                            "carry the run to another machine (echodistill/miniworld/snapshot.py says what it keeps)")
    modes.add_argument("--restore-snapshot", type=folder_argument, metavar="DIR",
                       help="write the checkpoints of DIR's snapshot into an empty <log-dir>/ckpt; then run again "
                            "without --restore-snapshot: it goes on from the stage after the last one the snapshot holds")
    args = parser.parse_args()

    settings = QUICK if args.quick else FULL
    log_dir = args.log_dir / "quick" if args.quick else args.log_dir
    model_root = log_dir / "models" if args.quick else (args.models_to or arch.MODEL_ROOT)
    oracle_root = log_dir / "oracle" if args.quick else (args.oracle_to or arch.ORACLE_ROOT)
    ckpt = log_dir / "ckpt"
    check_arguments(parser, args, ckpt, model_root, oracle_root)  # also sets --from-stage when it was left out
    if args.nothing_left:  # the same command again once it has finished: nothing lost, nothing to do
        print(f"the run in {log_dir} has finished every stage up to --to-stage {args.to_stage} (kept in {ckpt}): "
              f"nothing to do. A later --to-stage goes on from the {args.going_on} stage; removing a stage's "
              "checkpoint trains it again.")
        return
    first, last = STAGES.index(args.from_stage), STAGES.index(args.to_stage)
    kept = read_kept_checkpoints(parser, ckpt, first)
    torch.set_num_threads(args.threads)
    log = RunLog(log_dir)
    redo = lambda stage: STAGES.index(stage) >= first  # noqa: E731
    done = lambda stage: STAGES.index(stage) >= last  # noqa: E731
    log("train", f"start: {' '.join(sys.argv)}; seed {args.seed}; {hardware(args.device)}")
    log("train", f"settings: {json.dumps(asdict(settings))}")
    if STAGES.index("vae") < first <= STAGES.index("write"):
        log("train", f"from the {args.from_stage} stage, on the finished stages kept in {ckpt}")
    retrains_oracle = not args.mode and first <= STAGES.index("oracle") <= last and not args.keep_oracle
    if retrains_oracle and (oracle_root / "subject_encoder.safetensors").is_file():
        log("train", f"the oracle stage trains the oracles in {oracle_root} again (hours on a CPU); "
                     "--keep-oracle keeps them")
    cpu_start, wall_start = cpu_seconds(), time.time()
    teacher_config = family_config(CONFIG_ROOT / arch.FAMILY_OF_ROLE["teacher"]).scheduler
    student_config = family_config(CONFIG_ROOT / arch.FAMILY_OF_ROLE["student"]).scheduler

    if args.oracle_only:
        train_oracle_stage(settings, args, oracle_root, log)
        return
    if args.save_snapshot or args.restore_snapshot:
        try:
            if args.save_snapshot:
                done_parts = save_snapshot(ckpt, args.save_snapshot, settings.teacher, args.seed)
                log("train", f"snapshot of {ckpt} in {args.save_snapshot}: {json.dumps(done_parts)}")
            else:
                done_parts = restore_snapshot(args.restore_snapshot, ckpt, settings.teacher, args.seed)
                following = "write" if "student" in done_parts else "student" if done_parts.get("teacher") == "finished" \
                    else "teacher"
                log("train", f"restored {json.dumps(done_parts)} into {ckpt}; run the training command without "
                             f"--restore-snapshot to go on (from the {following} stage)")
        except SnapshotError as error:
            parser.error(str(error))
        return
    if args.image_prompt_only:
        image_prompt_stage(settings, args, model_root, oracle_root, ckpt, log)
        return
    if args.eval_only:
        report = evaluate_stage(model_root, oracle_root, settings, args, log_dir, log)
        atomic_write_text(log_dir / "eval.json", json.dumps({**report, "models": str(model_root)}, indent=2))
        return
    if first >= STAGES.index("oracle"):  # they read the written folders, not the checkpoints
        run_late_stages(settings, args, model_root, oracle_root, log_dir, log, redo, done, cpu_start, wall_start)
        return

    # 1. render -----------------------------------------------------------------------------
    started = time.time()
    rendered = render_set(settings.train_images, args.seed, workers=args.workers)
    log("render", f"{len(rendered.images)} scenes rendered in {time.time() - started:.0f} s; "
                  f"e.g. {rendered.captions[0].text!r}")
    tokenizer = load_clip_tokenizer("sd2")

    # 2. VAE --------------------------------------------------------------------------------
    vae = arch.build_vae()
    if redo("vae"):
        resume = ckpt / "vae_running.pt"
        vae = train_vae(rendered.images, settings.vae, args.seed, log.stage("vae"), resume, args.device)
        latents = encode_latents(vae, rendered.images, device=args.device)
        factor = set_scaling_factor(vae, latents)
        save_atomically(ckpt / "vae.pt", {"state": vae.state_dict(), "scaling_factor": factor})
        resume.unlink(missing_ok=True)
        # progress made on the old VAE's latents (finished teacher/student files are refused before a VAE retrain)
        for stale in ("teacher_running.pt", *STUDENT_PROGRESS):
            if (ckpt / stale).is_file():
                (ckpt / stale).unlink()
                log("vae", f"removed {stale}: it was trained on another VAE's latents")
    else:
        saved = kept["vae"]
        vae.load_state_dict(saved["state"])
        vae.register_to_config(scaling_factor=saved["scaling_factor"])
        vae.eval()
        latents = encode_latents(vae, rendered.images, device=args.device)
    vae.requires_grad_(False)
    held_out = render_set(256, args.seed + 10_000).images
    log("vae", f"scaling_factor {vae.config.scaling_factor:.5f}; held-out PSNR {reconstruction_psnr(vae, held_out):.2f} dB")
    if (oracle_root / "subject_encoder.safetensors").is_file():  # what any generator could reach through it
        log("vae", f"subject fidelity through the VAE (exact renders: ~0.9): {vae_ceiling(vae, Oracle.load(oracle_root))}")
    latents = latents * vae.config.scaling_factor  # (N, 4, 16, 16), unit variance
    if done("vae"):
        return finish(log, wall_start, cpu_start, "vae")

    # 3. text encoder + teacher -------------------------------------------------------------
    unet, text_encoder = arch.build_unet(), arch.build_text_encoder()
    if redo("teacher"):
        ids = tokenizer([c.text for c in rendered.captions], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids  # (N, 77)
        empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        resume = ckpt / "teacher_running.pt"
        if resume.is_file():  # the pretrained encoder's weights are in the loop state
            text_encoder = arch.build_text_encoder()
        else:
            captions = rendered.captions + [Caption("", {})] * (len(rendered.captions) // 10)  # the empty prompt too
            caption_ids = torch.cat([ids, empty.expand(len(captions) - len(ids), -1)])
            text_encoder = pretrain_text_encoder(caption_ids, stated_labels(captions), settings.text, args.seed,
                                                 log.stage("teacher"), args.device)
        unet, text_encoder = train_teacher(latents, ids, empty, teacher_config, settings.teacher, args.seed,
                                           log.stage("teacher"), text_encoder, resume, args.device)
        save_atomically(ckpt / "teacher.pt", {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()})
        resume.unlink(missing_ok=True)
        for stale in STUDENT_PROGRESS:  # from the teacher just replaced (a finished student.pt is refused first)
            if (ckpt / stale).is_file():
                (ckpt / stale).unlink()
                log("teacher", f"removed {stale}: it was made from the previous teacher")
    else:
        saved = kept["teacher"]
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    if done("teacher"):
        return finish(log, wall_start, cpu_start, "teacher")

    # 4. student ----------------------------------------------------------------------------
    student = arch.build_unet()
    if redo("student"):
        pair_set = render_set(settings.student.pairs, args.seed + 20_000)  # captions only: fresh prompts
        prompts = [c.text for c in pair_set.captions]
        with torch.no_grad():
            cond = torch.cat([encode_prompts(tokenizer, text_encoder, prompts[i : i + 512])
                              for i in range(0, len(prompts), 512)])  # (P, 77, D)
            uncond = encode_prompts(tokenizer, text_encoder, [""])  # (1, 77, D)
        noise = torch.randn((len(prompts), 4, 16, 16), generator=torch.Generator().manual_seed(args.seed + 4))
        targets = teacher_pairs(unet, cond, uncond, noise, teacher_config, settings.student, log.stage("student"),
                                args.device, resume_path=ckpt / "student_pairs.pt")
        student = distill_student(unet, noise, cond, targets, student_config, settings.student, args.seed,
                                  log.stage("student"), args.device, resume_path=ckpt / "student_running.pt")
        save_atomically(ckpt / "student.pt", {"unet": student.state_dict()})
        for finished in STUDENT_PROGRESS:
            (ckpt / finished).unlink(missing_ok=True)
    else:
        student.load_state_dict(kept["student"]["unet"])
    if done("student"):
        return finish(log, wall_start, cpu_start, "student")

    # 5. write the diffusers folders --------------------------------------------------------
    if redo("write"):
        teacher_dir = arch.write_model_folder(model_root / "teacher", "teacher", unet, text_encoder, vae)
        student_dir = arch.write_model_folder(model_root / "student", "student", student, text_encoder, vae)
        log("write", f"wrote {teacher_dir} ({arch.folder_size(teacher_dir) / 1e6:.2f} MB) and "
                     f"{student_dir} ({arch.folder_size(student_dir) / 1e6:.2f} MB)")
    if done("write"):
        return finish(log, wall_start, cpu_start, "write")

    run_late_stages(settings, args, model_root, oracle_root, log_dir, log, redo, done, cpu_start, wall_start)


def run_late_stages(settings: RunSettings, args: argparse.Namespace, model_root: Path, oracle_root: Path,
                    log_dir: Path, log: RunLog, redo, done, cpu_start: float, wall_start: float) -> None:
    # 6. oracles ----------------------------------------------------------------------------
    if redo("oracle") and not args.keep_oracle:
        train_oracle_stage(settings, args, oracle_root, log)
    if done("oracle"):
        return finish(log, wall_start, cpu_start, "oracle")

    # 7. the zero-training image-prompt adapter, on the written teacher -----------------------
    if redo("image_prompt"):
        image_prompt_stage(settings, args, model_root, oracle_root, log_dir / "ckpt", log)
    if done("image_prompt"):
        return finish(log, wall_start, cpu_start, "image_prompt")

    # 8. evaluation through the shipped files -----------------------------------------------
    report = evaluate_stage(model_root, oracle_root, settings, args, log_dir, log)
    elapsed, cpu = time.time() - wall_start, cpu_seconds() - cpu_start
    report["run"] = {"wall_s": round(elapsed), "cpu_s": round(cpu), "command": " ".join(sys.argv), "seed": args.seed,
                     "hardware": hardware(args.device), "shipped_bytes": arch.folder_size(model_root) + arch.folder_size(oracle_root)}
    atomic_write_text(log_dir / "eval.json", json.dumps(report, indent=2))
    log("train", f"done in {elapsed / 60:.1f} min wall, {cpu / 60:.1f} min CPU; report in {log_dir / 'eval.json'}")


ON_ITS_OWN = ("--eval-only", "--image-prompt-only", "--oracle-only", "--save-snapshot", "--restore-snapshot")


def logged_seeds(log: Path) -> set[int]:
    """The seeds the runs that trained the checkpoints logged in train.log (none when there is no log); runs on
    their own (--oracle-only, ...) leave ckpt/'s VAE, teacher and student alone and do not count."""
    if not log.is_file():
        return set()
    starts = re.findall(r"\] start: (.*?); seed (\d+);", log.read_text(errors="replace"))
    return {int(seed) for command, seed in starts if not any(flag in command.split() for flag in ON_ITS_OWN)}


def folder_argument(text: str) -> Path:
    """A folder named on the command line: an empty name (an unset shell variable) is refused, not read as '.'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder name (an empty one would mean the current folder)")
    return Path(text)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, ckpt: Path, model_root: Path,
                    oracle_root: Path) -> None:
    """Refuse, before anything is rendered or written, what the run could not finish (parser.error exits with 2).

    Sets args.from_stage when it was left out (where the run goes on: args.going_on), args.nothing_left
    when every stage up to --to-stage has finished, and args.mode (the flag of a run on its own, or None).
    """
    for flag, value in (("--threads", args.threads), ("--workers", args.workers)):
        if value < 1:
            parser.error(f"{flag} {value}: give 1 or more")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: give a non-negative integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    staged = args.from_stage is not None or args.to_stage != STAGES[-1]
    mode = next((flag for flag in ON_ITS_OWN if getattr(args, flag[2:].replace("-", "_"))), None)
    if mode and staged:
        parser.error(f"{mode} runs on its own: leave out --from-stage/--to-stage")
    args.mode = mode
    missing = next((stage for stage, name in FINISHED.items() if not (ckpt / name).is_file()), None)
    args.going_on = "write" if missing is None else "render" if missing == "vae" else missing  # render: from the start
    args.nothing_left = False
    if args.from_stage is None:
        args.from_stage = "render" if mode else args.going_on
        args.nothing_left = not mode and STAGES.index(args.to_stage) < STAGES.index(args.going_on)
    if not mode and not args.nothing_left:
        refuse_retraining_finished_stages(parser, args, ckpt)
    # a run that reads or resumes anything in ckpt/ must have the seed that trained it
    keeps = not mode and ckpt.is_dir() and any(ckpt.glob("*.pt"))
    if args.save_snapshot or keeps:
        trained = logged_seeds(ckpt.parent / "train.log")
        if trained and trained != {args.seed}:
            parser.error(f"--seed {args.seed}: the run in {ckpt.parent} trained with --seed "
                         f"{', '.join(map(str, sorted(trained)))} (its train.log); give that seed"
                         + (", or another --log-dir for a new run" if keeps else ""))
    if mode and args.device != "cpu":
        parser.error(f"{mode} runs on the CPU: --device applies to the VAE, text encoder, teacher and student stages")
    if args.quick and (args.models_to or args.oracle_to):
        parser.error("--quick writes into <log-dir>/quick: leave out --models-to/--oracle-to")
    if STAGES.index(args.to_stage) < STAGES.index(args.from_stage) and not args.nothing_left:
        parser.error(f"--to-stage {args.to_stage} comes before --from-stage {args.from_stage}")
    first, last = STAGES.index(args.from_stage), STAGES.index(args.to_stage)
    if not mode and first <= STAGES.index("write"):  # the stages before --from-stage are read back from ckpt/
        for stage, name in FINISHED.items():
            if STAGES.index(stage) < first and not (ckpt / name).is_file():
                parser.error(f"--from-stage {args.from_stage} reads {ckpt / name}, which does not exist: "
                             f"start from --from-stage {stage}")
    evaluates = args.eval_only or (not mode and args.to_stage == "eval")
    trains_oracle = first <= STAGES.index("oracle") and not args.keep_oracle
    if evaluates and not trains_oracle:
        try:
            Oracle.load(oracle_root)
        except OracleError as error:
            parser.error(f"the eval stage needs the oracle: {error}")
    reads_models = args.eval_only or args.image_prompt_only or (
        not mode and first > STAGES.index("write") and last >= STAGES.index("image_prompt"))
    written = [model_root / role / "model_index.json" for role in ("teacher", "student")]
    if reads_models and not all(path.is_file() for path in written):
        parser.error(f"{mode or '--from-stage ' + args.from_stage} reads the written models in {model_root}, which "
                     "holds none: run the write stage first (it writes them from the finished stages in ckpt/)")


def refuse_retraining_finished_stages(parser: argparse.ArgumentParser, args: argparse.Namespace, ckpt: Path) -> None:
    """A finished VAE, teacher or student (hours of training) is trained again only once its checkpoint is removed.

    Refuses --from-stage at or before a finished stage, and a gap in ckpt/ (a finished stage whose
    predecessor's checkpoint is gone: it would be removed once that predecessor is trained again).
    The message names every file to remove, the stage's progress files included (a stale one would
    be resumed from).
    """
    first = STAGES.index(args.from_stage)
    redone = [stage for stage, name in FINISHED.items() if STAGES.index(stage) >= first and (ckpt / name).is_file()]
    if not redone:
        return
    progress = {"vae": ("vae_running.pt",), "teacher": ("teacher_running.pt",), "student": STUDENT_PROGRESS}
    files = [ckpt / name for stage in redone for name in (FINISHED[stage], *progress[stage]) if (ckpt / name).is_file()]
    remove = f"remove {listed(files)} first"
    if STAGES.index(redone[-1]) > STAGES.index(args.going_on):  # a gap: what they were made from is gone
        gone = FINISHED["vae" if args.going_on == "render" else args.going_on]
        parser.error(f"{ckpt} holds {', '.join(FINISHED[s] for s in redone)} but not {gone}, which they were made "
                     f"from: put {gone} back to go on, or, to train again from there, {remove}.")
    parser.error(f"--from-stage {args.from_stage}: the {redone[0]} stage has finished ({ckpt / FINISHED[redone[0]]}); "
                 f"training it again starts it from scratch and removes what was made from it. To go on, leave out "
                 f"--from-stage (this run would go on from the {args.going_on} stage); to train it again, {remove}.")


def listed(paths: list[Path]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = [str(path) for path in paths]
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


# What each finished stage's checkpoint holds (save_atomically's payloads in main).
CHECKPOINT_KEYS = {"vae": {"state", "scaling_factor"}, "teacher": {"unet", "text_encoder"}, "student": {"unet"}}


def read_kept_checkpoints(parser: argparse.ArgumentParser, ckpt: Path, first: int) -> dict[str, dict]:
    """The finished stages this run reads instead of training them (when it writes the models), loaded before
    anything renders; one that cannot be read or is not that stage's checkpoint is refused (parser.error)
    naming it and what was made from it, not found broken after the minutes-long render."""
    kept = {}
    if first > STAGES.index("write"):  # the later stages read the written folders, not ckpt/
        return kept
    for stage, name in FINISHED.items():
        if STAGES.index(stage) < first:
            made_from = [ckpt / later for later_stage, later in FINISHED.items()
                         if STAGES.index(later_stage) >= STAGES.index(stage) and (ckpt / later).is_file()]
            remove = listed(made_from)
            try:
                kept[stage] = load_checkpoint(ckpt / name)
            except SnapshotError as error:
                parser.error(f"{error}: remove {remove} to train the {stage} stage again")
            missing = CHECKPOINT_KEYS[stage] - set(kept[stage]) if isinstance(kept[stage], dict) else CHECKPOINT_KEYS[stage]
            if missing:
                parser.error(f"{ckpt / name} is not a {stage} checkpoint (it lacks {', '.join(sorted(missing))}): "
                             f"remove {remove} to train the {stage} stage again")
    return kept


def finish(log: RunLog, wall_start: float, cpu_start: float, stage: str) -> None:
    log("train", f"stopped after the {stage} stage (--to-stage) in {(time.time() - wall_start) / 60:.1f} min wall, "
                 f"{(cpu_seconds() - cpu_start) / 60:.1f} min CPU")


def evaluate_stage(model_root: Path, oracle_root: Path, settings: RunSettings, args: argparse.Namespace,
                   log_dir: Path, log: RunLog) -> dict:
    """Load the written folders with load_model_pair, sample through echodistill.sampling, score with the oracle."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair = load_model_pair(model_root / "teacher", model_root / "student")
    log("eval", f"load_model_pair: {len(caught)} warnings {[str(w.message)[:120] for w in caught]}")
    oracle = Oracle.load(oracle_root)
    report, images = prompt_fidelity_report(pair, oracle, settings.eval_prompts, args.seed, log=log.stage("eval"))
    for name, batch in images.items():
        save_png(image_grid(batch[:64]), log_dir / f"eval_{name}.png")
    report["concept_prior"] = concept_prior(pair, oracle, log.stage("eval"))
    report["vae_ceiling"] = vae_ceiling(pair.vae, oracle)
    log("eval", f"subject fidelity through the VAE: {report['vae_ceiling']}")
    return report


def image_prompt_stage(settings: RunSettings, args: argparse.Namespace, model_root: Path, oracle_root: Path,
                       ckpt: Path, log: RunLog) -> None:
    """Train the image-prompt adapter on the written teacher (resumable) and write it beside the oracle."""
    pair = load_model_pair(model_root / "teacher", model_root / "student")
    resume = ckpt / "image_prompt_running.pt"
    adapter = train_image_prompt(pair.teacher.unet, pair.vae, pair.tokenizer, pair.text_encoder,
                                 pair.teacher.scheduler_config, settings.image_prompt, args.seed,
                                 log.stage("image_prompt"), resume_path=resume)
    path = adapter.save(adapter_path(oracle_root))
    resume.unlink(missing_ok=True)
    log("image_prompt", f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def train_oracle_stage(settings: RunSettings, args: argparse.Namespace, oracle_root: Path, log: RunLog) -> None:
    started = time.time()
    train = render_set(settings.oracle.images, args.seed + 30_000, oracle=True, workers=args.workers)
    valid = render_set(max(256, settings.oracle.images // 10), args.seed + 40_000, oracle=True)
    pool = subject_views(settings.oracle.subjects, settings.oracle.views, args.seed + 50_000)
    log("oracle", f"{len(train.images)} + {len(valid.images)} oracle scenes, {len(pool.images)} subject views "
                  f"in {time.time() - started:.0f} s")
    resume = args.log_dir / ("quick" if args.quick else "") / "ckpt" / "oracle_running.pt"
    oracle = train_oracles(train, valid, pool, settings.oracle, args.seed, log.stage("oracle"), resume)
    for part in ("reader", "encoder", "hard", "twins"):
        resume.with_name(f"{resume.stem}_{part}{resume.suffix}").unlink(missing_ok=True)
    log("oracle", f"generalization to unseen subjects: {json.dumps(generalization_report(oracle))}")
    oracle.save(oracle_root)
    log("oracle", f"wrote {oracle_root} ({arch.folder_size(oracle_root) / 1e6:.2f} MB)")


def concept_prior(pair, oracle: Oracle, log) -> dict[str, dict[str, float]]:
    """Before any personalization: the student's "a <class word>" pictures vs each concept's references.

    The subject fidelity a personalized model must beat, and, for scale, that of the references
    among themselves (the ceiling).
    """
    result = {}
    for name, concept in CONCEPTS.items():
        prompts = [p.text.replace(f"{TOKEN_PLACEHOLDER} ", "") for p in evaluation_prompts(concept)]
        images = sample_student(pair, prompts, seeds=list(range(len(prompts))), width=64, height=64,
                                return_latents=False).images
        references = reference_images(concept)
        result[name] = {"class_word_prior": round(oracle.subject_fidelity(images, references), 4),
                        "references_self": round(oracle.subject_fidelity(references, references), 4)}
        log(f"concept {name}: {result[name]}")
    return result


if __name__ == "__main__":
    main()
