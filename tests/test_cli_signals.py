"""SIGTERM (a scheduler's or `kill`'s stop) ends a command as Ctrl-C does: a resumable checkpoint, no stale locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echodistill.cli.terminal import exit_on_stop_signals
from echodistill.files import exclusive_output
from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _start(arguments: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as stream:
        return subprocess.Popen([sys.executable, "-m", "echodistill", *arguments], stdout=stream,
                                stderr=subprocess.STDOUT, env=env)


def _wait_for(log: Path, text: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"ended before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {seconds} s:\n{log.read_text()}"
        time.sleep(0.2)


def _locks(root: Path) -> list[Path]:
    """The notes naming a lock's holder: written while a process holds an output, removed when it lets go
    (the empty lock file itself stays, as filelock leaves it)."""
    return list(root.rglob("*.lock.owner"))


def test_sigterm_during_training_saves_a_checkpoint_that_resumes_and_leaves_no_lock(tmp_path):
    out, run_dir, log = tmp_path / "c.safetensors", tmp_path / "run", tmp_path / "log.txt"
    train = ["train", "--teacher", str(TEACHER_DIR), "--student", str(STUDENT_DIR), "--images",
             "miniworld/window", "--out", str(out), "--run-dir", str(run_dir), "--preset", "lite"]
    process = _start([*train, "--steps", "100000"], log)
    _wait_for(log, "1/100000", process)  # the progress bar after the first iteration
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "stopping after this iteration; a checkpoint will be saved (SIGTERM again to abort)" in text
    checkpoint = Path(text.split("resume with --resume ")[1].split()[0])
    assert checkpoint.is_file() and checkpoint.parent == run_dir
    assert not out.exists() and _locks(tmp_path) == []
    # the checkpoint it left is a real one: the same command resumes from it to the end
    step = int(text.split("stopped at step ")[1].split(";")[0])
    done = subprocess.run([sys.executable, "-m", "echodistill", *train, "--steps", str(step + 1),
                           "--resume", str(checkpoint)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {step} of {step + 1}" in done.stdout + done.stderr
    assert out.is_file() and _locks(tmp_path) == []


def test_sigterm_during_smoke_names_no_checkpoint_in_the_folder_it_removes(tmp_path):
    log = tmp_path / "log.txt"
    process = _start(["smoke", "--steps", "1000"], log)
    _wait_for(log, "1/1000", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "(in a temporary folder, now removed)" in text and "checkpoint:" not in text and "--resume" not in text


def test_sigterm_outside_training_unwinds_as_an_exception_that_releases_locks(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    target = tmp_path / "run"
    with pytest.raises(SystemExit) as stop, exit_on_stop_signals(), exclusive_output(target, "--run-dir"):
        assert _locks(tmp_path)  # held
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises long before this ends
    assert stop.value.code == 128 + signal.SIGTERM
    assert _locks(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_outside_training_unwinds_without_a_traceback():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop, exit_on_stop_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    assert stop.value.code == 128 + signal.SIGINT and signal.getsignal(signal.SIGINT) is previous


def test_a_stop_the_command_swallowed_still_sets_its_exit_status(monkeypatch):
    """As when the exit lands in a finalizer, where Python ignores exceptions: the work ends, the status says 143."""
    from echodistill.cli import demo, main

    def swallowing(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except SystemExit:
            pass
        return 0

    monkeypatch.setattr(demo, "run", swallowing)
    assert main(["demo"]) == 128 + signal.SIGTERM


def test_ctrl_c_after_training_stops_at_once_as_nothing_is_left_to_checkpoint():
    """Once training is over (the demo then draws and scores for a while) the first Ctrl-C ends the command, rather
    than promising a checkpoint after an iteration that will never come."""
    from echodistill.cli.terminal import SIGNALLED, TerminalCallbacks, stop_on_ctrl_c

    callbacks = TerminalCallbacks(3)
    SIGNALLED.clear()
    with pytest.raises(SystemExit) as stop, stop_on_ctrl_c(callbacks, resumable=False):
        callbacks.on_train_end(3)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    assert stop.value.code == 128 + signal.SIGINT and SIGNALLED == [signal.SIGINT]
    assert callbacks.bar.n == 3 and callbacks.bar.disable  # closed at the last step: what follows is no iteration
    SIGNALLED.clear()
