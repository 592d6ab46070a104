"""`echodistill demo`: the main job on the shipped mini world, with a progress bar (echodistill.jobs.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .terminal import TerminalCallbacks, parse_overrides, stop_on_ctrl_c

HELP = ("the main job on the shipped mini world: train a held-out concept, sample it, write a contact sheet, "
        "print the oracle metrics")


def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help=HELP)
    add_arguments(demo)
    demo.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.demo import DEFAULT_STEPS
    from ..miniworld import CONCEPTS

    parser.add_argument("--concept", choices=sorted(CONCEPTS), default=sorted(CONCEPTS)[0],
                        help="which held-out mini-world subject to learn")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-output", help="folder for the bundle, contact sheet and metrics")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: chosen per model size: 1 for the mini world)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training config field, e.g. --set echo=false")


def run(args: argparse.Namespace) -> int:
    from ..jobs.demo import run_demo

    if args.threads:
        from ..training.threads import set_cpu_threads

        set_cpu_threads(args.threads)
    print(f"EchoDistill on the shipped mini world: concept {args.concept!r}, {args.steps} steps, seed {args.seed}")
    overrides = parse_overrides(args.set)
    callbacks = TerminalCallbacks(overrides.get("steps", args.steps), preview_dir=Path(args.out) / "run")
    with stop_on_ctrl_c(callbacks):
        report = run_demo(args.out, concept_name=args.concept, steps=args.steps, seed=args.seed,
                          overrides=overrides, callbacks=callbacks)
    callbacks.bar.close()
    print(report.table())
    print(f"trained in {report.train_seconds:.0f} s; contact sheet {report.contact_sheet}; bundle {report.bundle}")
    return 0
