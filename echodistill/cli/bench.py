"""`echodistill bench ...`: the research harness (echodistill.benchmarks) from a shell.

    bench sample          one-step student vs diffusers' pipeline, same modules
    bench train           EchoDistill train_step per preset vs Custom Diffusion
    bench memory          each preset's estimated peak memory and FLOPs per iteration, SD 2.x and SDXL
    bench quality         subject/prompt fidelity and training time of EchoDistill, its ablations and baselines
    bench quality-merge   one quality table from runs made side by side
    bench lr-sweep        each quality-benchmark method's learning rate, chosen on a tuning concept and seed
    bench world-probe     whether the teacher alone learns each held-out subject (the mini world's fairness bar)
    bench threads         the demo's training step per CPU thread count, idle and beside busy processes

The only module of the package that imports the benchmarks; each one is imported when its command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

from .terminal import MAX_THREADS, add_command, check_count, number, whole_number

THREADS = whole_number("--threads", "a whole number of CPU threads", 1)
MAX_LOAD = 64  # busy background processes `bench threads` may start
MAX_BATCH = 1024  # images per timed call of `bench sample`
MAX_REPEATS = 1_000_000  # timed or warm-up calls / iterations per case
MAX_IMAGES_PER_PROMPT = 100  # 1,200 pictures per row and unit: beyond that, hours of drawing for no precision


def add_bench_command(commands) -> None:
    add_command(commands, "bench", help="benchmarks: a table on screen, every number in JSON",
                add_arguments=_add_bench_commands)


def _add_bench_commands(bench: argparse.ArgumentParser) -> None:
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    add_command(bench_commands, "sample", help="one-step student vs diffusers' pipeline, same modules",
                add_arguments=add_sample_arguments, run=run_sample)
    add_command(bench_commands, "train", help="EchoDistill train_step per preset vs Custom Diffusion",
                add_arguments=add_train_arguments, run=run_train)
    add_command(bench_commands, "memory",
                help="each preset's estimated peak memory and FLOPs per iteration (meta device; SD 2.x and SDXL)",
                add_arguments=add_memory_arguments, run=run_memory)
    add_command(bench_commands, "quality",
                help="subject/prompt fidelity and training time of EchoDistill, its ablations and baselines",
                add_arguments=add_quality_arguments, run=run_quality)
    add_command(bench_commands, "quality-merge",
                help="one quality table from runs made side by side (e.g. one process per seed)",
                add_arguments=add_merge_arguments, run=run_quality_merge)
    add_command(bench_commands, "lr-sweep",
                help="choose each quality-benchmark method's learning rate on a tuning concept and seed",
                add_arguments=add_lr_sweep_arguments, run=run_lr_sweep)
    add_command(bench_commands, "world-probe",
                help="whether the teacher alone (K/V + token row) learns each held-out subject: the mini world's "
                     "fairness bar (mean subject fidelity >= 0.50, prompt fidelity >= 0.80)",
                add_arguments=add_world_probe_arguments, run=run_world_probe)
    add_command(bench_commands, "threads",
                help="the demo's training step per CPU thread count, idle and beside busy processes",
                add_arguments=add_threads_arguments, run=run_threads)


def add_threads_arguments(threads: argparse.ArgumentParser) -> None:
    threads.add_argument("--steps", type=whole_number("--steps", "a whole number of timed steps", 4),
                         default=4, help="timed steps per case (after one warm-up step)")
    threads.add_argument("--load", type=whole_number("--load", "a whole number of busy processes", 1), action="append",
                         help="busy background processes for a case (repeatable; default: 0 and 1)")
    threads.add_argument("--threads", type=THREADS, action="append",
                         help="thread counts to time (repeatable; default: 1, the chosen count, all cores)")
    threads.add_argument("--out", type=json_out, default="bench-threads.json", help="every number, as JSON")
    add_overwrite_argument(threads, "--out file")


def run_threads(args: argparse.Namespace) -> int:
    from ..benchmarks.names import BenchError

    if args.steps < 1 or any(n < 0 for n in args.load or []) or any(n < 1 for n in args.threads or []):
        raise BenchError("--steps and --threads must be at least 1, --load at least 0")
    check_count("--steps", args.steps, 1, MAX_REPEATS, "timed steps")
    for load in args.load or []:
        check_count("--load", load, 0, MAX_LOAD, "busy processes")
    for threads in args.threads or []:
        check_count("--threads", threads, 1, MAX_THREADS, "CPU threads")
    with report_output(args):
        from ..benchmarks.threads import thread_benchmark, thread_table  # torch: only once --out is checked

        report = thread_benchmark(args.steps, tuple(args.load or (0, 1)),
                                  tuple(args.threads) if args.threads else None)
        return _finish(report, thread_table(report), args.out)


# --- bench sample, bench train -------------------------------------------------------------------

def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


DEVICE_HELP = "torch device, e.g. cpu, cuda (default: cuda when there is one, else cpu)"


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.names import DTYPE_NAMES, MODEL_HELP, MODEL_NAMES

    parser.add_argument("--model", choices=MODEL_NAMES, default="sd", help=MODEL_HELP)
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch", type=whole_number("--batch", "whole numbers of images", 16),
                        nargs="+", default=[1, 16], help="batch sizes to time")
    parser.add_argument("--size", type=pixels, default=512, help="image width and height in pixels (a multiple of 64)")
    parser.add_argument("--repeats", type=whole_number("--repeats", "a whole number of calls", 10),
                        default=10, help="timed calls per case")
    parser.add_argument("--warmup", type=whole_number("--warmup", "a whole number of calls", 2), default=2,
                        help="untimed calls per case first")
    parser.add_argument("--out", type=json_out, default="bench_sample.json", help="JSON file for every number")
    add_overwrite_argument(parser, "--out file")
    speed = parser.add_argument_group("speed options of echodistill's sampler (SamplerOptions)")
    speed.add_argument("--no-prompt-cache", action="store_true", help="re-encode the prompts every call")
    speed.add_argument("--channels-last", action="store_true", help="NHWC convolutions (UNet and VAE)")
    speed.add_argument("--fuse-qkv", action="store_true", help="fused self-attention q/k/v projections")
    speed.add_argument("--compile", action="store_true", help="torch.compile the student UNet (compiles in warm-up)")
    speed.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    speed.add_argument("--cuda-graph", action="store_true", help="capture the one-step student in a CUDA graph")
    _add_threads_argument(parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.names import DTYPE_NAMES, MODEL_HELP, MODEL_NAMES
    from ..training.config import PRESETS

    parser.add_argument("--model", choices=MODEL_NAMES, default="sd", help=MODEL_HELP)
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="weights dtype (presets autocast)")
    parser.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS),
                        help="training presets to time")
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of timed iterations", 10), default=10,
                        help="timed iterations per case")
    parser.add_argument("--warmup", type=whole_number("--warmup", "a whole number of iterations", 2), default=2,
                        help="untimed iterations per case first")
    parser.add_argument("--resolution", type=pixels, default=512,
                        help="training resolution in pixels (square, a multiple of 64)")
    parser.add_argument("--out", type=json_out, default="bench_train.json", help="JSON file for every number")
    add_overwrite_argument(parser, "--out file")
    _add_threads_argument(parser)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import PRESETS

    parser.add_argument("--models", nargs="+", choices=("sd", "sdxl", "tiny"), default=["sd", "sdxl"],
                        help="model lines to estimate: sd (SD-Turbo + SD 2.1 base), sdxl (SDXL-Turbo + SDXL base)")
    parser.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS),
                        help="training presets to estimate")
    parser.add_argument("--resolution", type=pixels, default=512,
                        help="training resolution in pixels (square, a multiple of 64)")
    parser.add_argument("--teacher-resolutions", type=pixels, nargs="*", default=[],
                        help="also count the teacher's own iteration alone at these sizes in pixels, e.g. 512 1024")
    parser.add_argument("--out", type=json_out, default="bench_memory.json", help="JSON file for every number")
    add_overwrite_argument(parser, "--out file")


def run_memory(args: argparse.Namespace) -> int:
    from ..benchmarks.names import BenchError
    from ..benchmarks.memory import bench_memory, memory_table

    sizes = [args.resolution, *args.teacher_resolutions]
    if any(size < 64 or size % 64 for size in sizes):
        raise BenchError(f"resolutions {sizes}: each must be a multiple of 64 pixels, at least 64")
    with report_output(args):
        report = bench_memory(tuple(args.models), tuple(args.presets), args.resolution, tuple(args.teacher_resolutions))
        return _finish(report, memory_table(report), args.out)


def pixels(text: str) -> int:
    """argparse type: a positive multiple of 64 (the VAE's 8 × the UNet's 8), checked before any model is built."""
    try:
        value = int(text) if "_" not in text else None  # int() reads digit separators: "5_12" would be 512
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels")
    if value <= 0 or value % 64:
        raise argparse.ArgumentTypeError(f"{value} must be a positive multiple of 64, e.g. {max(64, value // 64 * 64)}")
    return value


def json_out(text: str) -> str:
    """argparse type: a JSON file to write at the end, refused at once when it can never be written there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("'': name a .json file, e.g. bench.json")
    if text.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"{text} names a folder: name a .json file, e.g. {Path(text) / 'bench.json'}")
    path = Path(text)
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder: name a .json file, e.g. {path / 'bench.json'}")
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    except OSError as error:  # e.g. a name too long for the file system
        raise argparse.ArgumentTypeError(f"{text}: {error.strerror or error}") from None
    if blocking is not None:
        raise argparse.ArgumentTypeError(f"{blocking} is not a folder")
    return text


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier {what} (without it, it is refused, so that no finished "
                        "measurement is lost)")


def refuse_earlier_report(report: Path, args: argparse.Namespace, what: str = "an earlier report",
                          resumable: bool = False) -> None:
    """Refuse, before anything loads, to replace a finished report unasked (as train and demo refuse).

    `report` is the file the command writes: `args.out` itself or a file in that folder. `args.overwrite`
    allows replacing it, and so does `args.resume` where the command continues a stopped run (`resumable`).
    Raises BenchError naming the ways on.
    """
    from ..benchmarks.names import BenchError

    if not report.exists() or args.overwrite or (resumable and args.resume):
        return
    ways = ("pick another --out, pass --resume to continue it, or --overwrite to replace it" if resumable
            else "pick another --out, or pass --overwrite to replace it")
    if Path(args.out) == report:
        raise BenchError(f"--out {args.out} is {what}: {ways}")
    raise BenchError(f"--out {args.out} holds {what} ({report.name}): {ways}")


@contextlib.contextmanager
def report_output(args: argparse.Namespace, report: str | None = None, what: str = "an earlier report",
                  resumable: bool = False) -> Iterator[None]:
    """`--out` checked before anything loads and held by this process until the report is written.

    `report` is the file the command writes inside the `--out` folder (None: `--out` is that file). Refused
    (BenchError, OutputWriteError, OutputBusyError): an empty `--out`, a folder where the report goes, an
    earlier report (`refuse_earlier_report`), --resume with --overwrite, a folder that cannot be written, and
    another benchmark writing the same `--out`.
    """
    from ..benchmarks.names import BenchError
    from ..files import check_writable, exclusive_output

    if not str(args.out).strip():
        raise BenchError(f"--out '': name a {'folder' if report else 'file'} for the report")
    out = Path(args.out)
    path = out if report is None else out / report
    if report is not None and (path.is_dir() or (path.exists() and not path.is_file())):
        raise BenchError(f"--out {args.out}: {path} is a folder, not a report; move it away or pick another --out")
    if resumable and args.resume and args.overwrite:
        raise BenchError("--resume continues the report in --out and --overwrite replaces it: give one of them")
    refuse_earlier_report(path, args, what, resumable)
    check_writable(out if report is not None else out.parent, "--out")  # a file in the way, no permission
    with exclusive_output(out if report is not None else path, "--out", activity="benchmark"):
        yield


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=THREADS,
        help="CPU threads for torch (default: chosen per model size, see echodistill.training.threads). On a shared machine use fewer than the free cores: "
        "oversubscribed OpenMP threads spin and can make each op ~100x slower",
    )


def _set_threads(threads: int | None) -> None:
    from ..benchmarks.names import BenchError

    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads {threads} must be at least 1")
        check_count("--threads", threads, 1, MAX_THREADS, "CPU threads")
        from ..training.threads import set_cpu_threads

        set_cpu_threads(threads)


def _finish(report: dict, table: str, out: str) -> int:
    from ..models.tensor_files import atomic_write_text

    print(table)
    path = atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    for batch in args.batch:
        check_count("--batch", batch, 1, MAX_BATCH, "images per call")
    check_count("--repeats", args.repeats, 1, MAX_REPEATS, "timed calls")
    check_count("--warmup", args.warmup, 0, MAX_REPEATS, "untimed calls")
    with report_output(args):
        _set_threads(args.threads)
        from ..benchmarks.meta_run import flops_by_model
        from ..benchmarks.speed import bench_sample, sample_table
        from ..sampling.speed import SamplerOptions

        options = SamplerOptions(cache_prompts=not args.no_prompt_cache, channels_last=args.channels_last,
                                 fuse_qkv=args.fuse_qkv, compile=args.compile, compile_mode=args.compile_mode,
                                 cuda_graph=args.cuda_graph)
        report = bench_sample(args.model, _default_device(args.device), args.dtype, tuple(args.batch), args.size,
                              args.repeats, args.warmup, options)
        report["flops_by_model"] = flops_by_model(args.model, "sample", args.size)
        return _finish(report, sample_table(report), args.out)


def run_train(args: argparse.Namespace) -> int:
    check_count("--steps", args.steps, 1, MAX_REPEATS, "timed iterations")
    check_count("--warmup", args.warmup, 0, MAX_REPEATS, "untimed iterations")
    with report_output(args):
        _set_threads(args.threads)
        from ..benchmarks.meta_run import flops_by_model
        from ..benchmarks.speed import bench_train, train_table

        report = bench_train(args.model, _default_device(args.device), args.dtype, tuple(args.presets), args.steps,
                             args.warmup, args.resolution)
        report["flops_by_model"] = flops_by_model(args.model, "train", args.resolution, tuple(args.presets))
        return _finish(report, train_table(report), args.out)


# --- bench quality, bench quality-merge ----------------------------------------------------------

def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.methods import DEFAULT_METHODS, METHODS
    from ..miniworld.recipe import DEMO_STEPS, EVAL_IMAGES_PER_PROMPT, TUNED_LR_SCALES, TUNED_TOKEN_LRS

    parser.add_argument("--concepts", nargs="+",
                        help="held-out mini-world concepts, or fresh procedural subjects as procedural_<seed> or the "
                             "bare seed (e.g. 3000000-3099999, the validation seeds) (default: the six concepts)")
    parser.add_argument("--seeds", nargs="+", type=whole_number("--seeds", "whole numbers from 0", 0),
                        default=[0, 1], help="training and sampling seeds")
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", DEMO_STEPS),
                        default=DEMO_STEPS, help="training iterations of every method (equal budget; the budget the "
                                                 "rates were tuned at)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"rows to train and score: {', '.join(METHODS)} (default: all but image_prompt, the "
                             "zero-training row, which needs the --image-prompt adapter file)")
    parser.add_argument("--images-per-prompt", type=whole_number("--images-per-prompt", "a whole number of images",
                                                                   EVAL_IMAGES_PER_PROMPT),
                        default=EVAL_IMAGES_PER_PROMPT, help="images per evaluation prompt and run")
    parser.add_argument("--lr-scale", nargs="+", default=[], metavar="FAMILY=FACTOR",
                        help="multiply a family's published learning rates (`bench lr-sweep` chooses them; "
                             "default: " + " ".join(f"{f}={x:g}" for f, x in TUNED_LR_SCALES.items()) + "; "
                             "1 for the published rates)")
    parser.add_argument("--token-lr", nargs="+", default=[], metavar="FAMILY=RATE",
                        help="train a family's concept token row at RATE (`bench lr-sweep --token-rates` chooses "
                             "it; default: " + " ".join(f"{f}={x:g}" for f, x in TUNED_TOKEN_LRS.items()) + "; 0: "
                             "the rate of the adapters beside the row, as published)")
    parser.add_argument("--templates", action="store_true",
                        help="train on the prompt templates instead of the references' grammar captions")
    parser.add_argument("--models", help="folder with the mini world's teacher/ and student/ (default: shipped)")
    parser.add_argument("--oracle", help="oracle weights folder (default: the shipped mini-world oracle)")
    parser.add_argument("--image-prompt", metavar="FILE",
                        help="the image_prompt row's adapter (default: image_prompt/image_prompt_adapter.safetensors "
                             "beside the --oracle folder, where scripts/train_miniworld.py --image-prompt-only "
                             "writes it)")
    parser.add_argument("--out", default="runs/quality", help="folder for quality.json, quality.md, sheets/, bundles/")
    parser.add_argument("--resume", action="store_true", help="keep the finished concept x seed runs in --out")
    add_overwrite_argument(parser, "quality.json in --out")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--threads", type=THREADS,
                        help="CPU threads for torch (default: chosen per model size, as training chooses: 1 here)")


def shown_path(path: Path) -> str:
    """A path as a reader can use it elsewhere: relative to the working folder when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def quality_command_line(args: argparse.Namespace) -> str:
    """The exact, complete command for these settings (every default spelled out)."""
    from ..benchmarks.methods import parse_lr_scales, parse_token_lrs

    parts = ["echodistill", "bench", "quality", "--concepts", *args.concepts, "--seeds", *map(str, args.seeds),
             "--steps", str(args.steps), "--methods", *args.methods, "--images-per-prompt",
             str(args.images_per_prompt), "--lr-scale",
             *(f"{family}={factor:g}" for family, factor in parse_lr_scales(args.lr_scale).items()), "--token-lr",
             *(f"{family}={rate:g}" for family, rate in parse_token_lrs(args.token_lr).items()),
             *(["--templates"] if args.templates else []),
             *(["--models", shown_path(args.models)] if args.models else []),
             "--oracle", shown_path(args.oracle),
             *(["--image-prompt", shown_path(args.image_prompt)] if args.image_prompt else []),
             "--out", str(args.out), "--device", args.device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.resume:
        parts.append("--resume")
    return shlex.join(parts)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def check_models_folder(args: argparse.Namespace) -> tuple[Path, Path]:
    """The teacher and student folders of `args.models` (the shipped ones when it is not given); BenchError, before
    torch loads, when either is not a folder."""
    from ..benchmarks.names import BenchError
    from ..miniworld import STUDENT_DIR, TEACHER_DIR

    models = getattr(args, "models", None)
    teacher, student = (Path(models) / "teacher", Path(models) / "student") if models else (TEACHER_DIR, STUDENT_DIR)
    for folder in (teacher, student):
        if not folder.is_dir():
            where = f"--models {models}" if models else "the shipped mini-world models"
            raise BenchError(f"{where}: {folder} is not a folder; give a folder holding the mini world's teacher/ and "
                             "student/ diffusers folders (scripts/train_miniworld.py --models-to), or leave --models "
                             "out for the shipped ones")
    return teacher, student


def load_world(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """The shipped mini-world pair and the oracle of `args`, and the settings that identify them."""
    import torch

    from ..benchmarks.measuring import BenchError, device_name
    from ..miniworld import ORACLE_ROOT, Oracle
    from ..miniworld.oracle import ENCODER_FILE, READER_FILE
    from ..models.pair import load_model_pair

    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads {args.threads} must be at least 1")
        check_count("--threads", args.threads, 1, MAX_THREADS, "CPU threads")
        from ..training.threads import set_cpu_threads

        set_cpu_threads(args.threads)
    args.oracle = Path(args.oracle or ORACLE_ROOT)
    oracle = Oracle.load(args.oracle)  # before anything trains: a missing oracle fails at once
    teacher, student = check_models_folder(args)
    pair = load_model_pair(teacher, student, device=args.device)
    if args.threads is None:  # as training picks them (training.threads): one thread for the mini world's UNets
        from ..training.threads import configure_cpu_threads

        configure_cpu_threads(pair.teacher.unet, pair.device)
    settings = {
        "models": shown_path(Path(args.models)) if getattr(args, "models", None) else "shipped",
        "oracle": {"path": shown_path(args.oracle),
                   "digests": {f: _file_digest(args.oracle / f) for f in (READER_FILE, ENCODER_FILE)}},
        "device": device_name(pair.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return pair, oracle, settings


def image_prompt_file(args: argparse.Namespace) -> Path:
    """The image_prompt row's adapter file: --image-prompt, or the one beside --oracle (read before load_world).

    A missing file is a BenchError in one line naming the command that builds it.
    """
    from ..benchmarks.names import BenchError
    from ..miniworld import ORACLE_ROOT
    from ..miniworld.image_prompt import BUILD_COMMAND, adapter_path

    path = Path(args.image_prompt) if args.image_prompt else adapter_path(args.oracle or ORACLE_ROOT)
    if path.is_file():
        return path
    build = [".venv/bin/python", *BUILD_COMMAND.split(), *(["--models-to", args.models] if args.models else [])]
    if args.image_prompt:
        raise BenchError(f"--image-prompt {args.image_prompt} does not exist: give the file `{shlex.join(build)} "
                         "--oracle-to ORACLE` writes (ORACLE/../image_prompt/image_prompt_adapter.safetensors), or "
                         "leave image_prompt out of --methods")
    build += ["--oracle-to", args.oracle] if args.oracle else []
    raise BenchError(f"image-prompt adapter {shown_path(path)} does not exist: build it with `{shlex.join(build)}`, "
                     "or leave image_prompt out of --methods")


def run_quality(args: argparse.Namespace) -> int:
    from ..benchmarks.methods import parse_lr_scales, parse_token_lrs
    from ..benchmarks.names import held_out_subjects
    from ..benchmarks.quality_report import markdown, read_report
    from ..miniworld import CONCEPTS
    from ..miniworld.recipe import IMAGE_PROMPT

    # torch-free checks first: a bad request is refused at once, not after torch loads
    args.concepts = held_out_subjects(args.concepts or sorted(CONCEPTS), "--concepts")
    _check_training_numbers(args)
    lr_scales, token_lrs = parse_lr_scales(args.lr_scale), parse_token_lrs(args.token_lr)
    check_models_folder(args)
    with report_output(args, "quality.json", "an earlier benchmark's report", resumable=True):
        if args.resume and (Path(args.out) / "quality.json").is_file():  # a damaged report: before models load
            read_report(Path(args.out) / "quality.json", "give another --out, or --overwrite to start it anew")
        from ..benchmarks.quality import run_quality
        from ..miniworld.image_prompt import ImagePromptAdapter

        adapter = None
        if IMAGE_PROMPT in args.methods:  # before any model loads: a missing adapter fails at once
            args.image_prompt = image_prompt_file(args)
            adapter = ImagePromptAdapter.load(args.image_prompt)
        pair, oracle, settings = load_world(args)
        if adapter is not None:
            settings["image_prompt"] = {"path": shown_path(args.image_prompt),
                                        "digest": _file_digest(args.image_prompt)}
        report = run_quality(pair, oracle, concepts=args.concepts, seeds=args.seeds, steps=args.steps,
                             methods=args.methods, images_per_prompt=args.images_per_prompt, lr_scales=lr_scales,
                             token_lrs=token_lrs, captions=not args.templates, out=args.out,
                             settings={**settings, "command": quality_command_line(args)}, resume=args.resume,
                             image_prompt=adapter, log=_logger("quality"))
        print(markdown(report))
        print(f"wrote {Path(args.out) / 'quality.json'} and {Path(args.out) / 'quality.md'}")
        return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", help="--out folders of `bench quality` runs to merge")
    parser.add_argument("--out", required=True, help="folder for the merged quality.json and quality.md")
    add_overwrite_argument(parser, "quality.json in --out")


def same_folder(a: str, b: str) -> bool:
    """Whether two paths name one folder: the same resolved path, or (both existing) the same inode."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)  # a bind mount or a hard-to-resolve alias
    except OSError:
        return False


def run_quality_merge(args: argparse.Namespace) -> int:
    from ..benchmarks.names import BenchError
    from ..benchmarks.quality_report import markdown, merge_reports

    if any(same_folder(folder, args.out) for folder in args.folders):
        raise BenchError(f"--out {args.out} is one of the runs merged: give a new folder, so that its own report "
                         "is kept")
    with report_output(args, "quality.json", "an earlier report"):
        report = merge_reports(args.folders, args.out)
        print(markdown(report))
        print(f"wrote {Path(args.out) / 'quality.json'} and {Path(args.out) / 'quality.md'}")
        return 0


# --- bench lr-sweep ------------------------------------------------------------------------------

def add_lr_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.methods import LR_FAMILIES, TOKEN_LR_FAMILIES
    from ..miniworld.recipe import DEMO_STEPS, EVAL_IMAGES_PER_PROMPT

    parser.add_argument("--concept", default="procedural_3000002",
                        help="the tuning concept: a held-out concept's name, or a fresh procedural subject as "
                             "procedural_<seed> or the bare seed (e.g. 3000000), which no row of the table scores")
    parser.add_argument("--seed", type=whole_number("--seed", "a whole number from 0", 100),
                        default=100, help="tuning seed (keep it out of the table's seeds)")
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", DEMO_STEPS),
                        default=DEMO_STEPS, help="training iterations (the table's budget)")
    parser.add_argument("--factors", nargs="+", type=number("--factors", "positive numbers", 3.0),
                        help="multiples of each family's published learning rates to try (default: 0.3 1 3 10)")
    parser.add_argument("--token-rates", nargs="+", type=number("--token-rates", "rates above 0 and at most 1", 1e-3),
                        help="the second stage instead of --factors: rates of the concept token row to try beside "
                             "0 (its adapters' rate), each family at its --lr-scale factor (families that train a "
                             f"token row beside adapters: {', '.join(TOKEN_LR_FAMILIES)})")
    parser.add_argument("--lr-scale", nargs="+", default=[], metavar="FAMILY=FACTOR",
                        help="with --token-rates: each family's factor, as `bench quality --lr-scale` (default: the "
                             "tuned ones)")
    parser.add_argument("--families", nargs="+", metavar="FAMILY",
                        help=f"families to tune (default: all): {', '.join(LR_FAMILIES)}; with --token-rates: "
                             f"{', '.join(TOKEN_LR_FAMILIES)}")
    parser.add_argument("--images-per-prompt", type=whole_number("--images-per-prompt", "a whole number of images",
                                                                   EVAL_IMAGES_PER_PROMPT),
                        default=EVAL_IMAGES_PER_PROMPT, help="images per evaluation prompt and run (one image per prompt ranks noise)")
    parser.add_argument("--templates", action="store_true",
                        help="train on the prompt templates instead of the references' grammar captions")
    parser.add_argument("--models", help="folder with the mini world's teacher/ and student/ (default: shipped)")
    parser.add_argument("--oracle", help="oracle weights folder (default: the shipped mini-world oracle)")
    parser.add_argument("--out", default="runs/lr_sweep", help="folder for lr_sweep.json and lr_sweep.md")
    add_overwrite_argument(parser, "lr_sweep.json in --out")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--threads", type=THREADS,
                        help="CPU threads for torch (default: chosen per model size, as training chooses: 1 here)")


def lr_sweep_command_line(args: argparse.Namespace) -> str:
    from ..benchmarks.methods import parse_lr_scales

    stage = (["--token-rates", *(f"{r:g}" for r in args.token_rates), "--lr-scale",
              *(f"{f}={x:g}" for f, x in parse_lr_scales(args.lr_scale).items() if f in args.families)]
             if args.token_rates else ["--factors", *(f"{f:g}" for f in args.factors)])
    parts = ["echodistill", "bench", "lr-sweep", "--concept", args.concept, "--seed", str(args.seed), "--steps",
             str(args.steps), *stage, "--families", *args.families,
             "--images-per-prompt", str(args.images_per_prompt), *(["--templates"] if args.templates else []),
             *(["--models", shown_path(args.models)] if args.models else []),
             "--oracle", shown_path(args.oracle), "--out", str(args.out), "--device", args.device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def run_lr_sweep(args: argparse.Namespace) -> int:
    from ..benchmarks.methods import LR_FAMILIES, TOKEN_LR_FAMILIES, parse_lr_scales
    from ..benchmarks.names import BenchError, held_out_subjects

    # torch-free checks first: a bad request is refused at once, not after torch loads
    [args.concept] = held_out_subjects([args.concept], "--concept")
    _check_training_numbers(args)
    if args.token_rates and args.factors:
        raise BenchError("give --factors (the first stage) or --token-rates (the second), not both")
    if args.lr_scale and not args.token_rates:
        raise BenchError("--lr-scale sets the factors --token-rates trains at; the first stage (--factors) sweeps "
                         "them: leave --lr-scale out, or add --token-rates")
    args.factors = [] if args.token_rates else args.factors or [0.3, 1.0, 3.0, 10.0]
    for factor in args.factors:
        if not (math.isfinite(factor) and 0 < factor <= 1000):
            raise BenchError(f"--factors {factor:g}: give multiples of the published rates above 0 (and at "
                             "most 1000), e.g. --factors 0.3 1 3")
    for rate in args.token_rates or []:
        if not (math.isfinite(rate) and 0 < rate <= 1):
            raise BenchError(f"--token-rates {rate:g}: give rates above 0 and at most 1 (AdamW moves the row by "
                             "about the rate per step), e.g. --token-rates 3e-4 1e-3 3e-3")
    allowed = TOKEN_LR_FAMILIES if args.token_rates else LR_FAMILIES
    args.families = args.families or list(allowed)
    unknown = [family for family in args.families if family not in allowed]
    if unknown:
        what = " (the families that train a token row beside adapters)" if args.token_rates else ""
        raise BenchError(f"--families {' '.join(unknown)}: give one or more of {', '.join(allowed)}{what}")
    if len(set(args.families)) < len(args.families):
        raise BenchError(f"--families {' '.join(args.families)}: name each family once")
    lr_scales = parse_lr_scales(args.lr_scale)
    unswept = [spec for spec in args.lr_scale if spec.partition("=")[0] not in args.families]
    if unswept:
        raise BenchError(f"--lr-scale {' '.join(unswept)}: only the swept families' factors are used; give factors "
                         f"for {', '.join(args.families)} (--families), or leave the others out")
    args.factors = sorted(set(args.factors))
    args.token_rates = sorted(set(args.token_rates or []))
    check_models_folder(args)
    with report_output(args, "lr_sweep.json", "an earlier sweep's report"):
        from ..benchmarks.lr_sweep import markdown, quality_arguments, run_lr_sweep

        pair, oracle, settings = load_world(args)
        report = run_lr_sweep(pair, oracle, concept=args.concept, seed=args.seed, steps=args.steps,
                              factors=args.factors, token_rates=args.token_rates or (), lr_scales=lr_scales,
                              families=args.families,
                              images_per_prompt=args.images_per_prompt, captions=not args.templates, out=args.out,
                              settings={**settings, "command": lr_sweep_command_line(args)},
                              log=_logger("lr-sweep"))
        print(markdown(report))
        print(f"wrote {Path(args.out) / 'lr_sweep.json'} and {Path(args.out) / 'lr_sweep.md'}")
        print(quality_arguments(report))
        return 0


def _check_training_numbers(args: argparse.Namespace) -> None:
    """The seeds, steps and images per prompt of `bench quality` / `lr-sweep`, refused before anything loads."""
    from ..miniworld.recipe import MAX_UNIT_SEED
    from ..training.config import MAX_STEPS

    flag, seeds = ("--seeds", args.seeds) if hasattr(args, "seeds") else ("--seed", [args.seed])
    for seed in seeds:  # each seeds its evaluation noise seed x 100,000 + i, in 64 bits
        check_count(flag, seed, 0, MAX_UNIT_SEED, "as a seed")
    check_count("--steps", args.steps, 1, MAX_STEPS, "training steps")
    check_count("--images-per-prompt", args.images_per_prompt, 1, MAX_IMAGES_PER_PROMPT, "images")


def _logger(name: str):
    def log(message: str) -> None:
        print(f"[{name}] {message}", file=sys.stderr, flush=True)

    return log


# --- bench world-probe ---------------------------------------------------------------------------

MAX_PROBE_SEEDS = 20
MAX_PRIOR_IMAGES = 10_000


def read_probe_report(path: str) -> dict:
    """An earlier `bench world-probe` world_probe.json, checked to hold scored records; BenchError otherwise."""
    from ..benchmarks.names import BenchError

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise BenchError(f"--compare {path}: no such file; give a world_probe.json an earlier run wrote") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BenchError(f"--compare {path}: not a readable world_probe.json ({error})") from None
    records = report.get("records") if isinstance(report, dict) else None
    if not (isinstance(records, list) and records and all(
            isinstance(r, dict) and isinstance(r.get("concept"), str)
            and isinstance(r.get("subject_fidelity"), (int, float)) and not isinstance(r["subject_fidelity"], bool)
            and isinstance(r.get("seed", 0), int) and not isinstance(r.get("seed", 0), bool)
            for r in records)):
        raise BenchError(f"--compare {path}: no world-probe records in it (a list of subjects with their "
                         "subject_fidelity); give a world_probe.json an earlier run wrote")
    if not all(0 <= r["subject_fidelity"] <= 1 for r in records):  # NaN and infinities fail this too
        raise BenchError(f"--compare {path}: a subject fidelity outside 0..1 (or not a number) in it; give a "
                         "world_probe.json an earlier run wrote")
    units = [(r["concept"], r.get("seed", 0)) for r in records]
    if len(set(units)) != len(units):
        raise BenchError(f"--compare {path}: a subject and seed appear twice in it; give a world_probe.json an "
                         "earlier run wrote")
    return report

def add_world_probe_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmarks.probe_settings import DEFAULT_LR, PRIOR_IMAGES, TRAINABLE, ProbeSettings

    defaults = ProbeSettings()
    parser.add_argument("--concepts", nargs="+",
                        help="subjects: the held-out concepts' names, or fresh procedural subjects as procedural_<seed> or the bare "
                             "seed (e.g. 3000000-3099999, the validation seeds; the seeds the world's models and oracle "
                             "trained on are refused) (default: the six concepts)")
    parser.add_argument("--fresh", type=whole_number("--fresh", "a whole number of subjects", 6), default=0,
                        help="also probe this many fresh procedural subjects nobody tuned for (default: 0)")
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", 400),
                        default=defaults.steps, help="training iterations per subject")
    parser.add_argument("--trainable", choices=TRAINABLE, default=defaults.trainable,
                        help="what trains with the token row: adapter, the paper's K/V deltas (the bar); unet, every "
                             "UNet weight, DreamBooth-style (a diagnostic: is a shortfall the adapter's or the "
                             "teacher's?)")
    parser.add_argument("--lr", type=number("--lr", "a learning rate from 0 to 1", 1e-4),
                        help=f"learning rate of what --trainable names (default: {DEFAULT_LR['adapter']:g} for the "
                             f"adapter, {DEFAULT_LR['unet']:g} for the UNet)")
    parser.add_argument("--token-lr", type=number("--token-lr", "a learning rate from 0 to 1", 1e-3),
                        default=defaults.token_lr, help="learning rate of the token row")
    parser.add_argument("--min-scale", type=number("--min-scale", "a fraction in (0, 1]", 1.0),
                        default=defaults.min_scale,
                        help="smallest augmentation rescale, a fraction of the 64-pixel picture")
    parser.add_argument("--seed", type=whole_number("--seed", "a whole number from 0", 0),
                        default=defaults.seed, help="first training and sampling seed")
    parser.add_argument("--seeds", type=whole_number("--seeds", "a whole number of seeds", 2),
                        default=defaults.seeds,
                        help=f"seeds per subject, 1 to {MAX_PROBE_SEEDS}: --seed, --seed + 1, ... (default: "
                             f"{defaults.seeds}; one seed moves a subject by 0.1-0.3)")
    parser.add_argument("--prior-weight", type=number("--prior-weight", "a weight from 0 to 100", 1.0),
                        default=defaults.prior_weight,
                        help="weight of Custom Diffusion's class-prior term: the untrained teacher's own pictures "
                             "of the class word trained on beside the subject's (default: 0, the bar's plain loss; "
                             "above 0 the run is a diagnostic)")
    parser.add_argument("--prior-images", type=whole_number("--prior-images", "a whole number of class pictures",
                                                            PRIOR_IMAGES),
                        default=defaults.prior_images,
                        help=f"class pictures drawn per class word and seed for --prior-weight (default: "
                             f"{PRIOR_IMAGES}, Custom Diffusion's)")
    parser.add_argument("--compare", metavar="WORLD_PROBE_JSON",
                        help="an earlier run's world_probe.json: also report the paired difference in subject "
                             "fidelity over the subjects and seeds both probed")
    parser.add_argument("--models", help="folder with the mini world's teacher/ and student/ (default: shipped)")
    parser.add_argument("--oracle", help="oracle weights folder (default: the shipped mini-world oracle)")
    parser.add_argument("--out", default="runs/world_probe", help="folder for world_probe.json/.md and sheets/")
    add_overwrite_argument(parser, "world_probe.json in --out")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--threads", type=THREADS,
                        help="CPU threads for torch (default: chosen per model size, as training chooses: 1 here)")


def run_world_probe(args: argparse.Namespace) -> int:
    from ..benchmarks.names import BenchError, held_out_subjects
    from ..benchmarks.probe_settings import DEFAULT_LR, PRIOR_IMAGES, ProbeSettings, check_baseline
    from ..miniworld.recipe import MAX_UNIT_SEED
    from ..training.config import MAX_STEPS
    from ..miniworld import CONCEPTS
    from ..miniworld.procedural import VALIDATION_SEEDS, lookup_subject, procedural_name, procedural_subject

    names = args.concepts or sorted(CONCEPTS)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.trainable]
    if args.steps < 1:
        raise BenchError(f"--steps {args.steps}: give 1 or more training iterations per subject (the bar: 400)")
    check_count("--steps", args.steps, 1, MAX_STEPS, "training iterations per subject")
    # a subject the base models or the oracle trained on is no test of the world; each subject once
    subjects = [lookup_subject(name) for name in held_out_subjects(names, "--concepts")]
    if not 0 <= args.fresh <= len(VALIDATION_SEEDS.seeds()):
        raise BenchError(f"--fresh {args.fresh}: give 0 to {len(VALIDATION_SEEDS.seeds())} (the validation seeds)")
    for flag, value in (("--lr", args.lr), ("--token-lr", args.token_lr)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise BenchError(f"{flag} {value}: give a learning rate from 0 to 1")
    if args.lr == 0 and args.token_lr == 0:
        raise BenchError("--lr 0 and --token-lr 0 train nothing: give one of them a positive rate")
    if not (math.isfinite(args.min_scale) and 0 < args.min_scale <= 1):
        raise BenchError(f"--min-scale {args.min_scale}: give a fraction of the picture in (0, 1]")
    if not 0 <= args.seed <= MAX_UNIT_SEED:  # its evaluation noise is seeded seed x 100,000 + i, in 64 bits
        raise BenchError(f"--seed {args.seed}: give an integer from 0 to {MAX_UNIT_SEED}")
    check_count("--seeds", args.seeds, 1, MAX_PROBE_SEEDS, "seeds per subject")
    if not (math.isfinite(args.prior_weight) and 0 <= args.prior_weight <= 100):
        raise BenchError(f"--prior-weight {args.prior_weight}: give a weight from 0 to 100 (0: no class-prior term)")
    check_count("--prior-images", args.prior_images, 1, MAX_PRIOR_IMAGES, "class pictures")
    if args.prior_images != PRIOR_IMAGES and args.prior_weight == 0:
        raise BenchError(f"--prior-images {args.prior_images} is read only with a class-prior term: give "
                         "--prior-weight above 0 too, or leave --prior-images out")
    if args.seed + args.seeds - 1 > MAX_UNIT_SEED:
        raise BenchError(f"--seed {args.seed} --seeds {args.seeds}: the last seed passes {MAX_UNIT_SEED}")
    check_models_folder(args)
    report_path = Path(args.out) / "world_probe.json"
    with report_output(args, "world_probe.json", "an earlier probe's report"):
        baseline = None
        if args.compare is not None:
            if not args.compare.strip():
                raise BenchError("--compare '': give the world_probe.json of an earlier run")
            if Path(args.compare).resolve() == report_path.resolve():
                raise BenchError(f"--compare {args.compare} is the report this run writes: give another --out, so "
                                 "that the report compared with is kept")
            baseline = (str(Path(args.compare).resolve()), read_probe_report(args.compare))
        named = {subject.name for subject in subjects}  # --fresh adds subjects not named already: each once
        fresh = [seed for seed in VALIDATION_SEEDS.seeds() if procedural_name(seed) not in named][: args.fresh]
        subjects += [procedural_subject(seed) for seed in fresh]
        settings = ProbeSettings(steps=args.steps, lr=args.lr, token_lr=args.token_lr, min_scale=args.min_scale,
                                 seed=args.seed, seeds=args.seeds, trainable=args.trainable,
                                 prior_weight=args.prior_weight, prior_images=args.prior_images)
        if baseline is not None:
            try:
                check_baseline(subjects, settings, baseline[1])
            except ValueError as error:
                raise BenchError(f"--compare {args.compare}: {error}") from None
        from ..benchmarks.world_probe import markdown, run_world_probe as probe  # torch: only once the flags are good

        pair, oracle, world = load_world(args)
        report = probe(pair, oracle, subjects, settings, args.out,
                       extra={**world, "command": shlex.join(["echodistill", *sys.argv[1:]])},
                       log=_logger("world-probe"), baseline=baseline)
        print(markdown(report))
        print(f"wrote {Path(args.out) / 'world_probe.json'} and {Path(args.out) / 'world_probe.md'}")
        return 0
