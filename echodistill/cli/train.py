"""`echodistill train`, `smoke` and `inspect`: train a concept from checkpoints and photos, check the install,
say how a checkpoint is read."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from .terminal import (MAX_THREADS, TerminalCallbacks, add_command, built_config, check_count,
                       given_config_values, stop_on_ctrl_c, unknown_fields, whole_number)

SMOKE_STEPS = 4
DEFAULT_PRESET = "paper"
SMOKE_MAX_STEPS = 1000  # the tiny pair learns nothing: more steps check nothing more


MODEL_HELP = "checkpoint (.safetensors, .ckpt), diffusers folder, or the shipped mini world's miniworld/teacher|student"
FAMILY_HELP = ("model family (sd21-base, sd21-768v, sd-turbo, sd15, sdxl-base, sdxl-turbo) or a config folder; "
               "auto reads it from the file")


def model_source(name: str) -> str:
    """--teacher/--student: a path, or `miniworld/teacher|student` (the shipped pair, as the loaders list it)."""
    from ..miniworld.architecture import shipped_model

    try:
        shipped = shipped_model(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return str(shipped) if shipped is not None else name


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--teacher/--student and how they are loaded: shared by train, sample, teacher-sample."""
    parser.add_argument("--teacher", required=True, help=f"teacher {MODEL_HELP}, e.g. SD 2.1 base")
    parser.add_argument("--student", required=True, help=f"student {MODEL_HELP}, e.g. SD-Turbo")
    parser.add_argument("--teacher-family", default="auto", help=f"teacher {FAMILY_HELP}")
    parser.add_argument("--student-family", default="auto", help=f"student {FAMILY_HELP}")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="dtype the models are loaded in")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")


def add_train_command(commands) -> None:
    add_command(commands, "train", help="train a concept: teacher + one-step student through one text encoder",
                add_arguments=_train_arguments, run=_train)


def _train_arguments(train: argparse.ArgumentParser) -> None:
    from ..miniworld.recipe import DEMO_STEPS

    add_model_arguments(train)
    train.add_argument("--images", required=True,
                       help="folder of 3-20 concept photos (fewer is refused; more are all used, with a warning; "
                            "<photo>.txt beside one is its caption), or a mini-world "
                            "subject's references: miniworld/<subject>, e.g. miniworld/checker_diamond or "
                            "miniworld/procedural_3000000")
    train.add_argument("--token", help="the new word that stands for the concept in prompts (default: --config's "
                                       "token, else <v*>)")
    train.add_argument("--class-word", help="the subject's class, e.g. dog (required for a photo folder unless "
                                            "--config gives class_word; a mini-world subject's own class word by "
                                            "default)")
    train.add_argument("--out", required=True, help="concept bundle to write (.safetensors)")
    train.add_argument("--preset",
                       help="training preset: paper, balanced, lite, or miniworld (the demo's tuned rates and "
                            f"{DEMO_STEPS} steps, as a fleet manifest's preset = \"miniworld\"; for the mini world's "
                            "models) "
                            f"(default: {DEFAULT_PRESET}; not with --config)")
    train.add_argument("--config", help="a JSON config (from TrainConfig.to_json) instead of a preset; the flags "
                                        "below and --set change its values")
    train.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", 400),
                       help="training iterations (default: the preset's)")
    train.add_argument("--resolution", type=whole_number("--resolution", "a whole number of pixels, a multiple of 64",
                                                         512),
                       help="training resolution in pixels, square, a multiple of 64 (default: the student's native "
                            "size: 512 for SD-Turbo, 64 for the mini world)")
    train.add_argument("--batch-size", type=whole_number("--batch-size", "a whole number of images per iteration", 2),
                       help="images per iteration (default: the preset's)")
    train.add_argument("--seed", type=whole_number("--seed", "a whole number from 0", 42),
                       help="training seed (default: the preset's)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any config field, e.g. --set echo=false (repeatable); a field with its own flag "
                            "(--steps, --token, ...) may be given either way, not both with different values")
    train.add_argument(
        "--backbone",
        action="append",
        metavar="NAME=PATH",
        help="discriminator backbone (repeatable), e.g. clip_vit_h14=models/clip_vision/CLIP-ViT-H-14.safetensors",
    )
    train.add_argument("--ip-adapter", help="IP-Adapter .safetensors whose image projection shapes the semantic loss")
    train.add_argument("--resume", help="checkpoint.pt of a stopped run")
    train.add_argument("--run-dir", help="checkpoints and previews (default: next to --out)")
    train.add_argument("--overwrite", action="store_true",
                       help="train anew over an existing --out bundle and its run folder's checkpoint (without it, "
                            "either is refused, so that no finished or stopped run is lost)")


SMOKE_HELP = ("a quick check (well under a minute) of the install on a tiny random model pair written to a temporary folder: "
              "loads it as real checkpoints are loaded, encodes a concept prompt, trains a few steps")


def add_smoke_command(commands) -> None:
    add_command(commands, "smoke", help=SMOKE_HELP, add_arguments=_smoke_arguments, run=_smoke)


def _smoke_arguments(smoke: argparse.ArgumentParser) -> None:
    smoke.add_argument("--out", help="keep the tiny models and the concept in this folder (default: a temporary "
                                     "folder, deleted afterwards)")
    smoke.add_argument("--token", default="<v*>", help="the concept token to add")
    smoke.add_argument("--class-word", default="toy", help="the concept's class word")
    smoke.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", SMOKE_STEPS),
                       default=SMOKE_STEPS, help="training iterations")
    smoke.add_argument("--threads", type=whole_number("--threads", "a whole number of CPU threads", 1), default=1,
                       help="torch CPU threads: the tiny models gain nothing from more, and on a busy machine extra "
                            "threads make it ten times slower")


def add_inspect_command(commands) -> None:
    add_command(commands, "inspect", help="say which family a checkpoint is read as, and why (or what a concept holds)",
                add_arguments=_inspect_arguments, run=_inspect)


def _inspect_arguments(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("model", help="single-file checkpoint, diffusers folder or concept bundle (.safetensors)")
    inspect.add_argument("--family", default="auto", help=FAMILY_HELP)
    inspect.add_argument("--role", choices=("teacher", "student"), default="teacher",
                         help="read it as a teacher or as a student (families differ for single files)")
    inspect.add_argument("--load", action="store_true",
                         help="also load every part the role reads, one at a time (half precision, CPU), as training "
                              "would: every tensor's name, shape and type is checked (slower: reads all the weights)")


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
    announce: bool = True,
    resumable: bool = True,
) -> Path:
    """Train with terminal progress, save the bundle atomically; Ctrl-C saves a resumable checkpoint.

    Both outputs are held for this process (a second training into them is refused, naming this one) and
    probed for writing before the first step; the run ends with a checkpoint, so a bundle that cannot be
    written loses nothing. `announce`: print where the bundle was written (not for a folder about to be
    removed); `resumable`: whether the command takes --resume (what a stopped run's line tells).
    """
    from ..errors import OutputWriteError
    from ..files import check_writable, exclusive_output
    from ..training.trainer import Trainer

    check_writable(out.parent, "--out folder")
    check_writable(run_dir, "--run-dir")
    with exclusive_output(out, "--out"), exclusive_output(run_dir, "--run-dir"):
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
            callbacks.bar.write(f"resuming from step {trainer.step} of {config.steps} ({resume})")
            # counted as the bar's start, so that its rate and time left cover this run's steps only
            callbacks.bar.initial = callbacks.bar.n = callbacks.bar.last_print_n = trainer.step
            callbacks.bar.refresh()
        with stop_on_ctrl_c(callbacks, resumable=resumable, kept=announce):  # not announced: a temporary folder
            bundle = trainer.train()
        callbacks.bar.close()
        try:
            path = bundle.save(out)
        except OutputWriteError as exc:
            raise OutputWriteError(
                f"{exc}; the trained state is kept in {trainer.last_checkpoint} (step {bundle.step}): free space or "
                f"fix the folder, then run the same command with --resume {trainer.last_checkpoint} to write the "
                "bundle without training again"
            ) from exc
    if announce:
        print(f"concept bundle written: {path} (token {bundle.token!r}, {bundle.step} steps)")
    return path


def _train(args: argparse.Namespace) -> int:
    from ..models.pair import load_model_pair
    from ..sampling.samplers import native_resolution
    from ..training.config import LINE_PRESETS
    from ..training.photos import check_photo_count

    out = Path(args.out)
    if out.suffix != ".safetensors" or out.is_dir():  # checked before training: the bundle could never be written
        raise ConfigError(f"--out {args.out}: give the concept bundle's file name, ending in .safetensors "
                          f"(e.g. --out {out.with_suffix('.safetensors').name if out.suffix else out.name + '.safetensors'})")
    config = _train_config(args)
    backbones = _backbones(args.backbone or [])
    run_dir = Path(args.run_dir) if args.run_dir else out.with_suffix("").with_name(out.stem + "-run")
    _refuse_to_replace(out, run_dir, args)
    if backbones:
        config = config.with_changes(discriminators=tuple(dict.fromkeys((*config.discriminators, *backbones))))
    # Every photo given is used or named with its reason before the models load: a bad folder fails at once.
    photos = concept_images(args.images, config.resolution, min_size_fraction=0)
    print(photos.report())
    check_photo_count(photos, f"--images {args.images}")
    pair = load_model_pair(
        model_source(args.teacher),
        model_source(args.student),
        teacher_family=args.teacher_family,
        student_family=args.student_family,
        dtype=args.dtype,
        device=args.device,
    )
    given = args.value_sources.typed  # the fields the user gave (flags, --set); a --config file gives all it holds
    if not args.config and pair.is_sdxl:  # the preset as SDXL has it (LINE_PRESETS: lite trains LoRA K/V)
        config = config.with_changes(**{k: v for k, v in LINE_PRESETS["sdxl"].get(args.preset, {}).items()
                                        if k not in given})
    if "resolution" not in given and "resolution" not in args.value_sources.files:  # nobody chose one: the
        config = config.with_changes(resolution=native_resolution(pair, "student"))  # preset's 512 is noise at 64
    images = concept_images(args.images, config.resolution)  # again at the final resolution: its size check
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


def _refuse_to_replace(out: Path, run_dir: Path, args: argparse.Namespace) -> None:
    """A new run (no --resume, no --overwrite) never replaces a bundle or a stopped run's checkpoint: ConfigError
    naming the file and the two ways on."""
    from ..training.checkpointing import CHECKPOINT_NAME

    if args.resume or args.overwrite:
        return
    checkpoint = run_dir / CHECKPOINT_NAME
    if checkpoint.is_file():
        raise ConfigError(f"{checkpoint} holds an earlier run of this concept: continue it with --resume {checkpoint} "
                          "(ask for more --steps to train it further), or pass --overwrite to train anew",
                          parameters=("overwrite",))
    if out.exists():
        raise ConfigError(f"--out {out} already exists: pick another name, or pass --overwrite to train anew and "
                          "replace it", parameters=("overwrite",))


def _train_config(args: argparse.Namespace):
    """The TrainConfig `train` runs with, built once from every source, highest first: the flags typed and --set
    (a field given both ways must agree), the --config file's keys, the mini-world subject's class word, then the
    preset (--preset) or TrainConfig's defaults. Records where each value came from (`args.value_sources`), so
    that every message names it as the user gave it. Raises ConfigError listing every problem at once."""
    from dataclasses import fields

    from ..miniworld.recipe import PRESET as MINIWORLD_PRESET, preset_config
    from ..training.config import PRESETS, TrainConfig, preset

    if args.config and args.preset:  # a file holds every field a preset would set: one would silently lose
        raise ConfigError(f"--config {args.config} and --preset {args.preset}: give one of them (change the file's "
                          "values with the flags or --set)")
    args.preset = args.preset or DEFAULT_PRESET
    names = tuple(f.name for f in fields(TrainConfig))
    changes, sources = given_config_values(args, names)
    file_values = {}
    if args.config:
        text = _config_text(args.config)
        try:
            file_values = TrainConfig.json_fields(text)
        except ConfigError as error:
            raise ConfigError(f"--config {args.config}: {error}") from None
        unknown = unknown_fields(file_values, names, dict.fromkeys(file_values, f"in --config {args.config}"))
        sources.problems += [unknown] if unknown else []
        file_values = {key: value for key, value in file_values.items() if key in names}
        sources.files = {key: f"--config {args.config}" for key in file_values if key not in changes}
    args.value_sources = sources  # from here on, messages name each value as the user gave it
    if "class_word" not in changes and "class_word" not in file_values:
        try:
            changes["class_word"] = _subject_class_word(args.images)
        except ConfigError as missing:  # listed with the values' problems; a stand-in checks the rest
            sources.problems.append(missing)
            changes["class_word"] = "object"
    if args.config:  # built once, so that a file's value the flags change is never checked (nor warned about)
        return built_config(sources, lambda: TrainConfig.from_dict({**file_values, **changes}))
    if args.preset not in (*PRESETS, MINIWORLD_PRESET):
        raise ConfigError(f"--preset {args.preset}: give one of {', '.join((*PRESETS, MINIWORLD_PRESET))}")
    if args.preset == MINIWORLD_PRESET:
        return built_config(sources, lambda: preset_config(changes))
    return built_config(sources, lambda: preset(args.preset, **changes))


def _backbones(assignments: list[str]) -> dict[str, str]:
    """--backbone NAME=PATH (repeatable) as {name: path}; ConfigError naming the flag for a bad one."""
    from ..training.config import DISCRIMINATOR_KINDS

    backbones = dict(_split_assignment(b) for b in assignments)
    for name in backbones:
        if name not in DISCRIMINATOR_KINDS:
            raise ConfigError(f"--backbone {name}={backbones[name]}: {name!r} is no discriminator; name one of "
                              f"{', '.join(DISCRIMINATOR_KINDS)}, e.g. --backbone dinov2_vitl14=/models/dinov2")
    return backbones


def _subject_class_word(images: str) -> str:
    """A mini-world subject's class word (miniworld/<subject>); ConfigError for a photo folder without --class-word."""
    from ..miniworld.procedural import lookup_subject

    name = images.removeprefix("miniworld/") if images.startswith("miniworld/") and not Path(images).is_dir() else None
    if name is not None:
        try:
            return lookup_subject(name).class_word
        except ValueError as error:  # an unknown subject, not a folder missing its class word
            raise ConfigError(f"--images {images}: {error}") from None
    raise ConfigError("--class-word is required for a photo folder: the subject's class, e.g. --class-word dog")


def concept_images(source: str, resolution: int, min_size_fraction: float | None = None):
    """--images: a folder of photos, or "miniworld/<subject>" (drawn references with their captions)."""
    from ..miniworld.procedural import subject_references
    from ..training.data import load_concept_images

    size = {} if min_size_fraction is None else {"min_size_fraction": min_size_fraction}
    try:
        shipped = subject_references(source)
    except ValueError as error:
        raise ConfigError(f"--images {source!r}: {error}") from None
    if shipped is not None and not Path(source).is_dir():
        pictures, captions = shipped
        return load_concept_images(pictures, captions=captions, resolution=resolution, **size)
    return load_concept_images(source, resolution=resolution, **size)


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

    check_count("--steps", args.steps, 1, SMOKE_MAX_STEPS, "training steps (a smoke check takes a few)")
    check_count("--threads", args.threads, 1, MAX_THREADS, "CPU threads")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.out:
        _smoke_in(Path(args.out), args, kept=True)
        print(f"tiny models, concept and previews kept in {args.out}")
    else:  # no path is printed: it would name a folder that is gone by the time it is read
        with tempfile.TemporaryDirectory(prefix="echodistill-smoke-") as folder:
            _smoke_in(Path(folder), args, kept=False)
        print("tiny models, concept and previews were written to a temporary folder, now removed (--out DIR keeps them)")
    print(f"smoke check passed in {time.perf_counter() - started:.1f} s")
    return 0


def _smoke_in(root: Path, args: argparse.Namespace, kept: bool) -> None:
    import torch

    from ..models import tiny
    from ..models.concept import add_concept_token
    from ..models.pair import load_model_pair
    from ..models.pristine import pristine
    from ..training.config import preset
    from ..training.data import load_concept_images

    world = tiny.build_tiny_pair(root)
    families = world["families"]
    teacher = tiny.write_diffusers_folder(world["models"]["teacher"], root / "teacher", families["tiny-sd21"])
    student = tiny.write_single_file(
        world["models"]["student"], root / "student.safetensors", families["tiny-turbo"], "sgm", "openclip"
    )

    pair = load_model_pair(teacher, student, student_family=families["tiny-turbo"])
    print(f"teacher: {teacher.name}/ (a diffusers folder: its own config; {pair.teacher.prediction_type} prediction)")
    print(f"student: {student.name} (family {pair.student.family}: {pair.student.family_reason})")
    print(f"shared text encoder {pair.text_fingerprint}, VAE {pair.vae_fingerprint}")
    prompt = f"a photo of {args.token} {args.class_word}"
    with pristine(pair):  # the probe's token is added again by the trainer below
        concept = add_concept_token(pair.tokenizer, pair.text_encoder, args.token, args.class_word)
        ids = pair.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = pair.text_encoder(ids).last_hidden_state  # (1, 77, D)
    print(f"concept {concept.token!r} -> id {concept.token_id}; {prompt!r} -> embeddings {tuple(embeds.shape)}")

    images = load_concept_images(_demo_images(), resolution=64)
    steps = args.steps
    config = preset(
        "paper",
        steps=steps,
        resolution=64,  # the smallest the trainer takes: the tiny models draw at 64 px
        batch_size=1,
        token=args.token,
        class_word=args.class_word,
        echo_start=max(1, steps // 2),
        echo_every=max(1, steps // 4),
        echo_samples=2,
        sample_every=steps,
        save_every=0,
    )
    run_training(pair, images, config, out=root / "concept.safetensors", run_dir=root / "run", announce=kept,
                 resumable=False)  # smoke takes no --resume


def _config_text(path: str) -> str:
    """The --config file's text; ConfigError naming the flag for a file that is missing or not UTF-8 text."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # -sig: Windows Notepad starts UTF-8 with a BOM
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text: give a JSON file as TrainConfig.to_json writes") from None
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read ({exc.strerror or exc}): give an existing JSON file") from None


def _inspect(args: argparse.Namespace) -> int:
    from ..concepts.bundle import bundle_summary
    from ..models.loading import NAMED_FAMILY, ModelLoadError, ModelSource

    model = model_source(args.model)
    summary = bundle_summary(model) if Path(model).is_file() else None
    if summary is not None:
        from ..concepts.export import load_checked_bundle

        load_checked_bundle(model)  # what export and sample would refuse, refused here
        print("\n".join(summary))
        return 0
    source = ModelSource.open(model, args.family, role=args.role)
    source.check_files(args.role)  # a damaged or partial model is refused here, not at training time
    for component in source.config.text_components:  # an edited config.json, read against its weights' headers
        misfit = source.text_config_misfit(component)
        if misfit:
            raise ModelLoadError(misfit)
    if source.layout == "diffusers" and source.reason == NAMED_FAMILY:
        print(f"{source.path.name}: a diffusers folder, read with family {source.family}'s configs as named "
              "(leave --family on auto to read it with its own)")
    elif source.layout == "diffusers":  # its family is just its folder's name: its configs say what it is
        print(f"{source.path.name}: a diffusers folder with its own configs (no family to pick)")
    else:
        print(f"{source.path.name}: family {source.family} ({source.reason})")
    print(
        f"  layout {source.layout}, prediction {source.config.prediction_type}, "
        f"text encoder: {source.config.text_architecture}"
    )
    if args.load:
        print(f"  loads as a {args.role}: " + ", ".join(_load_parts(source, args.role)))
    return 0


def _load_parts(source, role: str) -> list[str]:
    """Load each component `role` reads (models.loading, as load_model_pair does), one at a time; "<part> N.NM
    parameters" for each. Raises ModelLoadError naming a missing, extra, misshapen or non-float tensor."""
    import torch

    from ..models.loading import load_text_encoder, load_unet, load_vae

    loaders = {"unet": load_unet, "vae": load_vae}
    parts = []
    dtype = torch.float16  # half the memory of fp32; every check still runs
    for component in source.components(role):
        if component in loaders:
            module = loaders[component](source, dtype=dtype)
        else:
            module = load_text_encoder(source, dtype=dtype, component=component)
        parts.append(f"{component} {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters")
        del module
    return parts
