"""`echodistill sample`, `teacher-sample`, `eval` and `export`: the commands after training."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import EchoDistillError
from .terminal import add_command, number, whole_number
from .train import add_model_arguments, model_source

PNG_KEY = "echodistill"


def add_commands(commands) -> None:
    add_command(commands, "sample", help="one-step student images (PNG, with prompt/seed/concept chunks)",
                add_arguments=lambda parser: add_sample_arguments(parser, teacher=False), run=run_sample)
    add_command(commands, "teacher-sample", help="multi-step teacher images (DDIM, CFG)",
                add_arguments=lambda parser: add_sample_arguments(parser, teacher=True), run=run_sample)
    add_command(commands, "eval", help="CLIP-T / CLIP-I / DINO of generated images vs the references",
                add_arguments=add_eval_arguments, run=run_eval)
    add_command(commands, "export", help="kohya LoRA + embedding for core ComfyUI nodes",
                add_arguments=add_export_arguments, run=run_export)


def _load(args: argparse.Namespace, part: str):
    from ..concepts.export import load_checked_bundle
    from ..models.pair import load_model_pair

    pair = load_model_pair(model_source(args.teacher), model_source(args.student), teacher_family=args.teacher_family,
                           student_family=args.student_family, dtype=args.dtype, device=args.device)
    bundle = None
    if args.concept:
        bundle = load_checked_bundle(args.concept)
        bundle.apply(pair, parts=(part,))
    return pair, bundle


def _prompts(args: argparse.Namespace) -> list[str]:
    """--prompt and --prompts-file's lines, read before any model loads; refused when there are none and no
    --concept gives a default prompt."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8-sig")  # -sig: a BOM is no prompt text
        except UnicodeDecodeError:
            raise EchoDistillError(f"--prompts-file {args.prompts_file}: not a UTF-8 text file; give one prompt "
                                   "per line") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts and not args.concept:
        raise EchoDistillError("give --prompt (repeatable) or --prompts-file (or a --concept, for its "
                               "'a photo of <token> <class word>')")
    return prompts


def _write_images(result, out: Path, *, sampler: str, steps: int, guidance: float, bundle, extra: dict) -> list[Path]:
    from ..imaging import save_png, to_pil

    written = []
    first = _next_index(out, sampler)  # after the images already there: a second call never replaces them
    for index, (image, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds), first):
        record = {"prompt": prompt, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance,
                  "concept": None if bundle is None else {"token": bundle.token, "class_word": bundle.class_word,
                                                           "step": bundle.step}, **extra}
        parameters = f"{prompt}\nSteps: {steps}, Sampler: {sampler}, CFG scale: {guidance}, Seed: {seed}"
        path = out / f"{sampler}-{index:03d}-seed{seed}.png"
        written.append(save_png(to_pil(image), path, {"parameters": parameters, PNG_KEY: json.dumps(record)}))
    return written


def _next_index(out: Path, sampler: str) -> int:
    """1 + the highest index of `sampler`'s images in `out` (<sampler>-<index>-seed<seed>.png), 0 for none."""
    pattern = re.compile(rf"^{re.escape(sampler)}-(\d+)-seed\d+\.png$")
    found = [int(m.group(1)) for p in out.glob(f"{sampler}-*.png") if (m := pattern.match(p.name))] if out.is_dir() else []
    return max(found, default=-1) + 1


MAX_COUNT, MAX_SIDE = 10_000, 4096  # images per prompt; pixels per side (8x SD 2.1's native 512)


def _check_sample_numbers(args: argparse.Namespace, part: str) -> None:
    """Refuse numbers no model can use, naming the flag, before anything is loaded or allocated."""
    import math

    if not 1 <= args.count <= MAX_COUNT:
        raise EchoDistillError(f"--count {args.count}: give 1 to {MAX_COUNT} images per prompt")
    if not 0 <= args.seed <= 2**62:
        raise EchoDistillError(f"--seed {args.seed}: give a seed from 0 to {2**62}")
    low, high = (1, 4) if part == "student" else (1, 1000)
    if not low <= args.steps <= high:
        what = "the one-step student takes 1 (2-4 optional)" if part == "student" else "e.g. 25"
        raise EchoDistillError(f"--steps {args.steps}: give {low} to {high} ({what})")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise EchoDistillError(f"--guidance {args.guidance}: give a finite scale >= 0 (1 or less switches it off)")
    for side in ("width", "height"):
        value = getattr(args, side)
        if value is not None and not 0 < value <= MAX_SIDE:
            raise EchoDistillError(f"--{side} {value}: give 1 to {MAX_SIDE} pixels (or leave it out: the "
                                   "models' native size)")


def run_sample(args: argparse.Namespace) -> int:
    from ..files import check_writable

    part = "teacher" if args.command == "teacher-sample" else "student"
    _check_sample_numbers(args, part)  # before anything loads (torch too): a typo costs no wait
    given = _prompts(args)
    from ..sampling.samplers import native_resolution, sample_student, sample_teacher

    check_writable(args.out, "--out folder")  # before loading models and sampling
    pair, bundle = _load(args, part)
    given = given or [f"a photo of {bundle.token} {bundle.class_word}"]
    prompts = [p for p in given for _ in range(args.count)]
    seeds = [args.seed + i for i in range(len(prompts))]
    native = native_resolution(pair, part)  # 512 for SD 2.1 base and SD-Turbo, 64 for the mini world
    width, height = args.width or native, args.height or native
    common = dict(seeds=seeds, steps=args.steps, width=width, height=height, guidance=args.guidance)
    if part == "teacher":
        result = sample_teacher(pair, prompts, negative_prompt=args.negative_prompt, **common)
    else:
        result = sample_student(pair, prompts, schedule=args.schedule.replace("-", "_"), **common)
    extra = {"fingerprints": pair.fingerprints()}
    if part == "student":
        extra["schedule"] = args.schedule
    paths = _write_images(result, Path(args.out), sampler=part, steps=args.steps, guidance=args.guidance,
                          bundle=bundle, extra=extra)
    print(f"{len(paths)} image{'s' if len(paths) != 1 else ''} of {width}x{height} px written to {args.out}")
    return 0


def add_sample_arguments(parser: argparse.ArgumentParser, *, teacher: bool) -> None:
    add_model_arguments(parser)
    parser.add_argument("--concept", help="a concept bundle (.safetensors) to apply (default: none, the base model)")
    parser.add_argument("--prompt", action="append",
                        help="prompt (repeatable) (default: 'a photo of <token> <class>' of --concept)")
    parser.add_argument("--prompts-file", help="a text file of prompts, one per line, added to --prompt")
    parser.add_argument("--count", type=whole_number("--count", "a whole number of images per prompt", 4), default=1,
                        help="images per prompt")
    parser.add_argument("--seed", type=whole_number("--seed", "a whole number from 0", 0), default=0,
                        help="seed of the first image; the next ones count up")
    steps = 25 if teacher else 1
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of denoising steps", steps),
                        default=steps,
                        help="denoising steps" + ("" if teacher else " (1-4; the student is made for 1)"))
    parser.add_argument("--guidance", type=number("--guidance", "a guidance scale", 7.5),
                        default=7.5 if teacher else 0.0,
                        help="classifier-free guidance scale; 1 or less switches it off")
    if not teacher:
        parser.add_argument("--schedule", default="trailing", choices=("trailing", "comfyui-turbo"),
                            help="timesteps for 2+ steps: trailing (999/499 at 2 steps, what training previews "
                                 "use) or comfyui-turbo (999/899/799..., as ComfyUI's SDTurboScheduler with the "
                                 "euler sampler); one step is t = 999 either way")
    for side in ("width", "height"):
        parser.add_argument(f"--{side}", type=whole_number(f"--{side}", "a whole number of pixels", 512),
                            help=f"image {side} in pixels, a multiple of the models' latent grid (default: the "
                                 f"{'teacher' if teacher else 'student'}'s native size: 512 for SD 2.1 base and "
                                 f"SD-Turbo, 768 for SD 2.1 768-v, 64 for the mini world)")
    if teacher:
        parser.add_argument("--negative-prompt", default="", help="what to steer away from (with guidance > 1)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")


def _read_images(folder: str, what: str):
    """(images (3, H, W) in [0, 1], each PNG's prompt or None) through the photo loader every
    command shares: the same errors for a missing folder or an unreadable file, and every file
    not used is named on stderr."""
    import numpy as np
    import torch

    from ..miniworld.procedural import subject_references
    from ..training.photos import load_concept_images

    try:
        shipped = subject_references(folder)
    except ValueError as error:
        raise EchoDistillError(f"--{what} {folder!r}: {error}") from None
    if shipped is not None and not Path(folder).is_dir():  # miniworld/<subject>: its drawn references
        pixels = [np.asarray(picture, dtype=np.float32) / 255.0 for picture in shipped[0]]  # (H, W, 3) each
        return [torch.from_numpy(p).permute(2, 0, 1) for p in pixels], [None] * len(pixels)
    try:
        photos = load_concept_images(folder, min_size_fraction=0)
    except EchoDistillError as error:  # which of the two folders: the flag says
        raise type(error)(f"--{what}: {error}") from None
    print(f"{what}: {photos.report('picture' if what == 'images' else 'photo')}", file=sys.stderr)
    images, prompts = [], []
    for item in photos:
        pixels = np.asarray(item.image, dtype=np.float32) / 255.0  # (H, W, 3)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        try:
            prompts.append(json.loads(item.text.get(PNG_KEY, "{}")).get("prompt"))
        except (ValueError, AttributeError):
            prompts.append(None)
    return images, prompts


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.metrics import evaluate
    from ..files import atomic_write_text, check_writable

    if args.out:
        if Path(args.out).exists() and not args.overwrite:  # as the bench commands: no finished scores are lost
            raise EchoDistillError(f"--out {args.out} holds earlier scores: pick another --out, or pass --overwrite "
                                   "to replace them")
        check_writable(Path(args.out).parent, "--out folder")
    generated, prompts = _read_images(args.images, "images")
    references, _ = _read_images(args.references, "references")
    if args.prompt:
        prompts = list(args.prompt) * (len(generated) // len(args.prompt) or 1)
    if any(p is None for p in prompts):
        prompts = None  # CLIP-T needs each image's prompt: from the PNG chunk or --prompt
    scores = evaluate(generated, references, prompts, token=args.token, class_word=args.class_word,
                      clip_path=args.clip, dino_path=args.dino, device=args.device)
    report = {"images": len(generated), "references": len(references), **scores}
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of generated images (prompts read from their PNG chunks)")
    parser.add_argument("--references", required=True,
                        help="folder of the concept's real photos, or a mini-world subject: miniworld/<subject>")
    parser.add_argument("--token", default="<v*>", help="the concept token in the prompts (replaced for CLIP-T)")
    parser.add_argument("--class-word", required=True, help="the subject's class, e.g. dog")
    parser.add_argument("--prompt", action="append",
                        help="prompt of the images (repeatable, cycled over them) (default: read from the PNGs)")
    parser.add_argument("--clip", help="CLIP folder (transformers CLIPModel, e.g. ViT-L/14-336) for CLIP-T and CLIP-I")
    parser.add_argument("--dino", help="DINOv2 / DINO ViT folder for the DINO score")
    parser.add_argument("--device", default="cpu", help="torch device for the scoring models, e.g. cpu, cuda")
    parser.add_argument("--out", help="write the scores as JSON here (default: print them only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier scores file at --out (without it, it is refused)")


def run_export(args: argparse.Namespace) -> int:
    from ..concepts.bundle import ConceptBundle
    from ..concepts.export import export_concept, export_targets

    name = args.name or Path(args.concept).stem
    export_targets(name, args.out, args.embedding_out, overwrite=args.overwrite)  # refuse before loading
    unet_config = _unet_config(args.unet_config) if args.unet_config else None
    bundle = ConceptBundle.load(args.concept)
    report, targets = export_concept(bundle, name, args.out, args.embedding_out, part=args.part, mode=args.mode,
                                     rank=args.rank, overwrite=args.overwrite, unet_config=unet_config)
    print(report.summary())
    print(f"embedding: {targets.embedding}  (prompt with '{targets.prompt_word}' in place of {bundle.token!r})")
    return 0


def _unet_config(path: str) -> dict:
    """A diffusers UNet config: the JSON file itself, or `unet/config.json` of a diffusers or family folder."""
    file = Path(path)
    if file.is_dir():
        file = next((f for f in (file / "unet" / "config.json", file / "config.json") if f.is_file()), file)
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EchoDistillError(f"--unet-config {path}: not a readable UNet config.json "
                               f"(give the file, or a folder holding unet/config.json): {error}") from None
    if not isinstance(config, dict) or "block_out_channels" not in config:
        raise EchoDistillError(f"--unet-config {path}: {file.name} is not a diffusers UNet config (no block_out_channels)")
    from ..models.families import unet_config_problems

    problems = unet_config_problems(config)
    if problems:  # named here, where the file is known, not later as "the UNet config"
        raise EchoDistillError(f"--unet-config {path}: {file} cannot describe a UNet ({'; '.join(problems)}): give "
                               "the config.json of the UNet the concept was trained on")
    return config


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concept", required=True, help="concept bundle (.safetensors)")
    parser.add_argument("--out", required=True, help="folder for the LoRA, e.g. ComfyUI/models/loras")
    parser.add_argument("--embedding-out", help="folder for the embedding, e.g. ComfyUI/models/embeddings "
                        "(default: --out, as <name>_embedding.safetensors)")
    parser.add_argument("--name", help="file stem (default: the bundle's): letters, digits, _ - . only, so that "
                        "prompts can say embedding:<name>")
    parser.add_argument("--part", default="student", choices=("student", "teacher"),
                        help="which model's adapters to export")
    parser.add_argument("--mode", default="lowrank", choices=("lowrank", "diff"),
                        help="lowrank (default): lora_up/lora_down factors that ComfyUI, diffusers, A1111/Forge "
                             "and InvokeAI load; exact at full rank, but then larger than diff. diff: exact "
                             "weight patches, not loaded by diffusers")
    parser.add_argument("--rank", type=whole_number("--rank", "a whole-number rank", 16),
                        help="rank for --mode lowrank (default: full, exact; a lower rank is smaller and "
                             "approximate, its error is reported)")
    parser.add_argument("--unet-config", help="the UNet's diffusers config (config.json, or a folder holding "
                        "unet/config.json): checks the export against it; names the keys of an SDXL concept saved "
                        "without its UNets' configs (concepts trained by this version store them)")
    parser.add_argument("--overwrite", action="store_true", help="replace files that exist")
