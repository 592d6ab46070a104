"""`echodistill train`, `smoke` and `inspect`: train a concept from checkpoints and photos, check the install,
say how a checkpoint is read."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from .terminal import TerminalCallbacks, parse_overrides, stop_on_ctrl_c


def add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train a concept: teacher + one-step student through one text encoder")
    train.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors) or diffusers folder")
    train.add_argument("--student", required=True, help="student checkpoint (.safetensors) or diffusers folder")
    train.add_argument("--images", required=True, help="folder of concept photos (3-20)")
    train.add_argument("--token", default="<v*>")
    train.add_argument("--class-word", required=True, help="the subject's class, e.g. dog")
    train.add_argument("--out", required=True, help="concept bundle to write (.safetensors)")
    train.add_argument("--preset", default="paper", help="paper, balanced or lite")
    train.add_argument("--config", help="a JSON config (from TrainConfig.to_json) instead of a preset")
    train.add_argument("--steps", type=int)
    train.add_argument("--resolution", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. --set echo=false")
    train.add_argument(
        "--backbone",
        action="append",
        metavar="NAME=PATH",
        help="discriminator backbone, e.g. clip_vit_h14=models/clip_vision/CLIP-ViT-H-14.safetensors",
    )
    train.add_argument("--ip-adapter", help="IP-Adapter .safetensors whose image projection shapes the semantic loss")
    train.add_argument("--resume", help="checkpoint.pt of a stopped run")
    train.add_argument("--run-dir", help="checkpoints and previews (default: next to --out)")
    train.add_argument("--teacher-family", default="auto")
    train.add_argument("--student-family", default="auto")
    train.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    train.add_argument("--device", default="cpu")
    train.set_defaults(run=_train)


def add_smoke_command(commands) -> None:
    smoke = commands.add_parser("smoke", help="seconds-long check on a tiny random model pair written to disk")
    smoke.add_argument("--out", help="folder for the tiny models (default: a temp folder)")
    smoke.add_argument("--token", default="<v*>")
    smoke.add_argument("--class-word", default="toy")
    smoke.add_argument("--steps", type=int, default=20)
    smoke.set_defaults(run=_smoke)


def add_inspect_command(commands) -> None:
    inspect = commands.add_parser("inspect", help="say which family a checkpoint is read as, and why")
    inspect.add_argument("model", help="single-file checkpoint or diffusers folder")
    inspect.add_argument("--family", default="auto")
    inspect.add_argument("--role", choices=("teacher", "student"), default="teacher")
    inspect.set_defaults(run=_inspect)


def run_training(
    pair,
    images,
    config,
    *,
    out: Path,
    run_dir: Path,
    resume: str | None = None,
    backbone_paths: dict | None = None,
    ip_adapter: str | None = None,
) -> Path:
    """Train with terminal progress, save the bundle atomically; Ctrl-C saves a resumable checkpoint."""
    from ..training.trainer import Trainer

    callbacks = TerminalCallbacks(config.steps, preview_dir=run_dir)
    trainer = Trainer(
        pair,
        images,
        config,
        backbone_paths=backbone_paths,
        ip_adapter_path=ip_adapter,
        run_dir=run_dir,
        callbacks=callbacks,
    )
    if resume:
        trainer.resume(resume)
        callbacks.bar.n = trainer.step
    with stop_on_ctrl_c(callbacks):
        bundle = trainer.train()
    callbacks.bar.close()
    path = bundle.save(out)
    print(f"concept bundle written: {path} (token {bundle.token!r}, {bundle.step} steps)")
    return path


def _train(args: argparse.Namespace) -> int:
    from ..models.pair import load_model_pair
    from ..training.config import TrainConfig, preset
    from ..training.data import load_concept_images

    overrides = parse_overrides(args.set or [])
    for name in ("steps", "resolution", "batch_size", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides.update(token=args.token, class_word=args.class_word)
    if args.config:
        config = TrainConfig.from_json(Path(args.config).read_text()).with_changes(**overrides)
    else:
        config = preset(args.preset, **overrides)
    backbones = dict(_split_assignment(b) for b in args.backbone or [])
    if backbones:
        config = config.with_changes(discriminators=tuple(dict.fromkeys((*config.discriminators, *backbones))))
    images = load_concept_images(args.images, resolution=config.resolution)
    print(images.report())  # every photo given: used, or named with the reason it is not
    pair = load_model_pair(
        args.teacher,
        args.student,
        teacher_family=args.teacher_family,
        student_family=args.student_family,
        dtype=args.dtype,
        device=args.device,
    )
    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_suffix("").with_name(out.stem + "-run")
    run_training(
        pair,
        images,
        config,
        out=out,
        run_dir=run_dir,
        resume=args.resume,
        backbone_paths=backbones,
        ip_adapter=args.ip_adapter,
    )
    return 0


def _split_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--backbone {text!r}: write name=path, e.g. --backbone dinov2_vitl14=/models/dinov2")
    return name, value


def _demo_images(count: int = 4, size: int = 64):
    """A small distinctive subject (a red ring around a blue square) in varied positions."""
    from PIL import Image, ImageDraw

    pictures = []
    for index in range(count):
        picture = Image.new("RGB", (size, size), (235, 230, 220))
        draw = ImageDraw.Draw(picture)
        x, y = 8 + 6 * index, 10 + 4 * (index % 2)
        draw.ellipse((x, y, x + 36, y + 36), outline=(200, 30, 40), width=5)
        draw.rectangle((x + 12, y + 12, x + 24, y + 24), fill=(30, 60, 200))
        pictures.append(picture)
    return pictures


def _smoke(args: argparse.Namespace) -> int:
    """Smoke run on a tiny random pair: load it like real checkpoints, encode a concept prompt, train briefly."""
    import torch

    from ..models import tiny
    from ..models.concept import add_concept_token
    from ..models.pair import load_model_pair
    from ..training.config import preset
    from ..training.data import load_concept_images

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="echodistill-smoke-"))
    started = time.perf_counter()
    world = tiny.build_tiny_pair(root)
    families = world["families"]
    teacher = tiny.write_diffusers_folder(world["models"]["teacher"], root / "teacher", families["tiny-sd21"])
    student = tiny.write_single_file(
        world["models"]["student"], root / "student.safetensors", families["tiny-turbo"], "sgm", "openclip"
    )

    probe = load_model_pair(teacher, student, student_family=families["tiny-turbo"])
    concept = add_concept_token(probe.tokenizer, probe.text_encoder, args.token, args.class_word)
    prompt = f"a photo of {args.token} {args.class_word}"
    ids = probe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = probe.text_encoder(ids).last_hidden_state  # (1, 77, D)
    print(f"teacher  {teacher}  family={probe.teacher.family} prediction={probe.teacher.prediction_type}")
    print(f"student  {student}  family={probe.student.family} ({probe.student.family_reason})")
    print(f"shared text encoder {probe.text_fingerprint}, VAE {probe.vae_fingerprint}")
    print(f"concept {concept.token!r} -> id {concept.token_id}; {prompt!r} -> embeddings {tuple(embeds.shape)}")

    pair = load_model_pair(teacher, student, student_family=families["tiny-turbo"])
    images = load_concept_images(_demo_images(), resolution=64)
    config = preset(
        "paper",
        steps=args.steps,
        resolution=64,
        token=args.token,
        class_word=args.class_word,
        echo_start=max(1, args.steps // 2),
        echo_every=max(1, args.steps // 4),
        echo_samples=4,
        sample_every=args.steps,
        save_every=0,
    )
    run_training(pair, images, config, out=root / "concept.safetensors", run_dir=root / "run")
    print(f"previews in {root / 'run'}; done in {time.perf_counter() - started:.1f} s")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..models.loading import ModelSource

    source = ModelSource.open(args.model, args.family, role=args.role)
    print(f"{source.path.name}: family {source.family} ({source.reason})")
    print(
        f"  layout {source.layout}, prediction {source.config.prediction_type}, "
        f"text encoder: {source.config.text_architecture}"
    )
    return 0
