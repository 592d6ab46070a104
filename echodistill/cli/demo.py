"""`echodistill demo`: the main job on the shipped mini world, with a progress bar (echodistill.jobs.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EchoDistillError
from .terminal import (MAX_THREADS, TerminalCallbacks, add_command, built_config, check_count, given_config_values,
                       stop_on_ctrl_c, whole_number)

HELP = ("the main job on the shipped mini world: train a held-out subject, sample it, write a contact sheet, "
        "print the oracle metrics (about 3 minutes on an idle 2-core CPU at the default steps)")


def add_demo_command(commands) -> None:
    add_command(commands, "demo", help=HELP, add_arguments=add_arguments, run=run)


def subject_name(text: str) -> str:
    """argparse type of --concept: a shipped subject's name, or a fresh procedural subject as procedural_<seed>
    or its bare seed (miniworld.procedural.fresh_subject_name). Raises ArgumentTypeError (one line)."""
    from ..miniworld.procedural import fresh_subject_name

    try:
        return fresh_subject_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..miniworld.concepts import CONCEPTS  # numpy only: the help lists the names without torch
    from ..miniworld.procedural import VALIDATION_SEEDS
    from ..miniworld.recipe import DEMO_SEED, DEMO_STEPS

    fresh = VALIDATION_SEEDS.start
    parser.add_argument("--concept", type=subject_name, default=sorted(CONCEPTS)[0], metavar="SUBJECT",
                        help=f"the subject to learn: a shipped one ({', '.join(sorted(CONCEPTS))}) or a fresh "
                             f"procedural one, procedural_<seed> or just its seed, e.g. procedural_{fresh} or {fresh} "
                             f"(seeds {fresh}-{VALIDATION_SEEDS.stop - 1} were never trained on; the seeds the "
                             "world's models and oracle trained on are refused)")
    parser.add_argument("--steps", type=whole_number("--steps", "a whole number of training steps", DEMO_STEPS),
                        help=f"training iterations (default: {DEMO_STEPS})")
    parser.add_argument("--seed", type=whole_number("--seed", "a whole number from 0", DEMO_SEED),
                        help=f"seed of training and of the sampling noise (default: {DEMO_SEED})")
    parser.add_argument("--out", default="demo-output", help="folder for the bundle, contact sheet and metrics")
    parser.add_argument("--overwrite", action="store_true",
                        help="run anew over an earlier demo's results in --out (without it, they are refused, so "
                             "that no finished run is lost)")
    parser.add_argument("--threads", type=whole_number("--threads", "a whole number of CPU threads", 1), default=None,
                        help="torch CPU threads (default: chosen per model size: 1 for the mini world)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training config field, e.g. --set echo=false (repeatable); steps and seed may be "
                             "given either way, not both with different values")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..files import check_writable
    from ..jobs.demo import demo_config, demo_outputs, refuse_to_replace, run_demo
    from ..miniworld.recipe import DEMO_SEED, DEMO_STEPS, MAX_UNIT_SEED
    from ..training.config import TrainConfig

    check_count("--threads", args.threads, 1, MAX_THREADS, "CPU threads")
    if args.threads:
        from ..training.threads import set_cpu_threads

        set_cpu_threads(args.threads)
    if not args.out.strip():
        raise EchoDistillError("--out '': name the folder for the bundle, contact sheet and metrics")
    refuse_to_replace(args.out, args.concept, args.overwrite)  # as train refuses: before anything is printed
    # --steps / --seed or --set (not both with different values); messages name each value as the user gave it
    overrides, args.value_sources = given_config_values(args, tuple(f.name for f in fields(TrainConfig)))
    steps, seed = overrides.pop("steps", DEMO_STEPS), overrides.pop("seed", DEMO_SEED)
    config = built_config(args.value_sources,  # a bad value is refused before any output, every one at once
                          lambda: demo_config(args.concept, steps, seed, overrides))
    if config.seed > MAX_UNIT_SEED:
        typed = args.value_sources.typed.get("seed", "seed ")  # "--seed" or "--set seed=", as the user gave it
        given = f"{typed}{config.seed}" if typed.endswith(("=", " ")) else f"{typed} {config.seed}"
        raise EchoDistillError(f"{given}: give 0 to {MAX_UNIT_SEED:,} (the demo's sampling noise is seeded "
                               "seed x 100,000 + i, which torch keeps in 64 bits)")
    check_writable(args.out, "--out")  # an unusable folder too (removed again if the run fails)
    print(f"EchoDistill on the shipped mini world: concept {args.concept!r}, {config.steps} steps, seed {config.seed}")
    callbacks = TerminalCallbacks(config.steps, preview_dir=Path(args.out) / "run")
    with stop_on_ctrl_c(callbacks, resumable=False):  # the demo takes no --resume
        report = run_demo(args.out, concept_name=args.concept, steps=steps, seed=seed, overrides=overrides,
                          callbacks=callbacks, overwrite=args.overwrite)
    callbacks.bar.close()
    print(report.table())
    print(f"trained in {report.train_seconds:.0f} s; contact sheet {report.contact_sheet}; bundle {report.bundle}; "
          f"metrics {demo_outputs(args.out, report.concept).metrics}")
    return 0
