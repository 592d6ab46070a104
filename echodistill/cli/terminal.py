"""What the commands share: training progress in a terminal, Ctrl-C as a clean stop, --set parsing."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError


class TerminalCallbacks:
    """tqdm progress with the current losses; the first Ctrl-C asks for a clean, resumable stop."""

    def __init__(self, total: int, start: int = 0, preview_dir: Path | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="EchoDistill", unit="it", dynamic_ncols=True)
        self.preview_dir = preview_dir
        self.stop_requested = False

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        self.bar.n = step
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss/")})

    def on_preview(self, step: int, images) -> None:
        if self.preview_dir is None:
            return
        from ..imaging import save_grid

        save_grid(images, self.preview_dir / f"preview-{step:06d}.png")

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, *_):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.bar.write("stopping after this iteration; a checkpoint will be saved (Ctrl-C again to abort)")


@contextlib.contextmanager
def stop_on_ctrl_c(callbacks: TerminalCallbacks) -> Iterator[None]:
    """While training: the first Ctrl-C stops cleanly; a cancelled run says where to resume and exits 130."""
    from ..training.callbacks import TrainingCancelled

    previous = signal.signal(signal.SIGINT, callbacks.request_stop)
    try:
        yield
    except TrainingCancelled as cancelled:
        callbacks.bar.close()
        print(f"stopped at step {cancelled.step}; resume with --resume {cancelled.checkpoint}")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value pairs; values are JSON where they parse as JSON, strings otherwise."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: write key=value, e.g. --set echo=false")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
