"""The library's training callbacks wired to ComfyUI: progress bar, previews, loss text, Cancel."""

from __future__ import annotations

import comfy.model_management
import comfy.utils

from echodistill.imaging import to_pil
from echodistill.training.callbacks import Callbacks

PREVIEW_SIZE = 512


class ComfyCallbacks(Callbacks):
    """ComfyUI's progress hook raises on Cancel (and clears the flag): we turn that into a stop
    request, so the trainer saves its checkpoint first and the node re-raises afterwards."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.node_id = node_id
        self.cancelled = False

    def _update(self, step: int, total: int, preview=None) -> None:
        try:
            self.bar.update_absolute(step, total, preview)
        except comfy.model_management.InterruptProcessingException:
            self.cancelled = True

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        self._update(step, total)
        losses = "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in logs.items() if k.startswith("loss/"))
        self._text(f"step {step}/{total}  {losses}")

    def on_preview(self, step: int, images) -> None:
        self._update(step, self.bar.total, ("JPEG", to_pil(images[0]), PREVIEW_SIZE))

    def should_stop(self) -> bool:
        return self.cancelled or comfy.model_management.processing_interrupted()

    def _text(self, text: str) -> None:
        try:
            from server import PromptServer
        except ImportError:  # running outside a server (in-process tests)
            return
        if PromptServer.instance is not None and self.node_id is not None:
            PromptServer.instance.send_progress_text(text, self.node_id)
