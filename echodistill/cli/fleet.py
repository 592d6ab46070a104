"""`echodistill fleet run | status | report`: a manifest of concepts trained on Ray (echodistill.fleet).

Ray is imported only when `fleet run` starts, so the rest of the command line works without it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import EchoDistillError
from .terminal import MAX_THREADS, check_count, whole_number

MAX_WORKERS = 1024  # worker slots of one fleet run
MAX_ATTEMPTS = 100  # tries per concept


def missing_ray() -> str:
    """How to add Ray to the Python that runs this command (a bare `pip` may belong to another one)."""
    import shlex

    return (f"the fleet needs Ray, which this Python does not have: {shlex.quote(sys.executable)} -m pip install "
            "'ray>=2.9' (the pack's optional extra: pip install -e '.[fleet]' in its folder)")


def add_fleet_command(commands) -> None:
    fleet = commands.add_parser("fleet", help="train the concepts of a manifest on Ray, one machine or a cluster")
    actions = fleet.add_subparsers(dest="fleet_command", required=True)

    run = actions.add_parser("run", help="train every concept of MANIFEST (finished ones are verified and skipped)")
    run.add_argument("manifest", help="a TOML manifest (docs/fleet.md)")
    run.add_argument("--out", required=True, help="a shared folder for bundles, checkpoints and the state file")
    run.add_argument("--workers", type=whole_number("--workers", "a whole number of worker slots", 2),
                     help="worker slots (default: one per GPU, else 1)")
    run.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="where workers train: auto = one CUDA device per worker when there are GPUs, else the CPU")
    run.add_argument("--threads", type=whole_number("--threads", "a whole number of CPU threads", 1),
                     help="torch CPU threads per worker on CPU (default 1)")
    run.add_argument("--max-attempts", type=whole_number("--max-attempts", "a whole number of tries", 3), default=3,
                     help="tries per concept when workers are lost")
    run.add_argument("--check", action="store_true",
                     help="check the manifest, read every concept's photos and load the teacher/student pair once "
                          "on the CPU, as every worker will (an unreadable photo, missing or mismatched tensors show "
                          "here, not on the cluster); train nothing")
    run.set_defaults(run=_run)

    status = actions.add_parser("status", help="each concept's state: queued, training step k, done or failed")
    status.add_argument("--out", required=True, help="the --out folder of a fleet run")
    status.set_defaults(run=_status)

    report = actions.add_parser("report", help="write fleet-report.md and .json under --out")
    report.add_argument("--out", required=True, help="the --out folder of a fleet run (the report is written there)")
    report.add_argument("--metrics", action="store_true",
                        help="score finished mini-world concepts with the world's oracles (slower)")
    report.set_defaults(run=_report)


def _run(args: argparse.Namespace) -> int:
    from ..fleet.manifest import load_manifest

    check_count("--workers", args.workers, 1, MAX_WORKERS, "worker slots")
    check_count("--threads", args.threads, 1, MAX_THREADS, "CPU threads per worker")
    check_count("--max-attempts", args.max_attempts, 1, MAX_ATTEMPTS, "tries per concept")
    from ..files import check_creatable, check_writable

    manifest = load_manifest(args.manifest)  # every problem at once, before Ray starts
    print(f"{manifest.path.name}: {len(manifest.concepts)} concepts, teacher {manifest.teacher}, "
          f"student {manifest.student}")
    if args.check:
        from ..errors import DataError
        from ..fleet.manifest import photo_problems
        from ..models.pair import load_model_pair

        check_creatable(args.out, "--out folder")  # as a run would make it; --check writes nothing
        problems = photo_problems(manifest)
        if problems:
            raise DataError(f"{len(problems)} concept(s) whose photos cannot be trained on:\n  - "
                            + "\n  - ".join(problems))
        print("every concept's photos read, as its worker will read them")

        teacher, student = manifest.model_paths()
        pair = load_model_pair(teacher, student, teacher_family=manifest.teacher_family,
                               student_family=manifest.student_family, dtype=manifest.dtype, device="cpu")
        print(f"the pair loads, as every worker will load it (one text encoder shared, fingerprint "
              f"{pair.text_fingerprint}); nothing trained (--check)")
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # the manifest is fine, but the run itself could not start
            print(f"warning: {missing_ray()}", file=sys.stderr)
        return 0
    try:
        from ..fleet.engine import FleetOptions, run_fleet, start_ray, stop_ray
    except ImportError as exc:
        if exc.name == "ray":
            raise EchoDistillError(missing_ray()) from None
        raise
    check_writable(args.out, "--out folder")  # before Ray starts: a file in the way is named, not a worker's error
    started = start_ray(args.address)
    try:
        state = run_fleet(manifest, args.out, FleetOptions(workers=args.workers, device=args.device,
                                                           threads=args.threads, max_attempts=args.max_attempts))
    finally:
        if started:
            stop_ray()
    print("\n".join(state.status_lines()))
    return 0 if all(r.get("status") in ("done", "skipped") for r in state.concepts.values()) else 1


def _status(args: argparse.Namespace) -> int:
    from ..fleet.state import FleetState

    print("\n".join(FleetState.load(args.out).status_lines()))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..fleet.state import FleetState

    state = FleetState.load(args.out)
    if args.metrics:
        from ..files import check_writable
        from ..fleet.metrics import score_miniworld

        check_writable(args.out, "--out folder")  # before minutes of scoring, not after
        score_miniworld(state)  # into fleet-metrics.json: the state file is the driver's alone
    markdown, json_path = state.write_report()
    print(markdown.read_text(encoding="utf-8"))
    print(f"written: {markdown} and {json_path}")
    return 0
