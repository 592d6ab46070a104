"""ComfyUI entry point of the EchoDistill node pack (V3 `comfy_entrypoint` registration only)."""

import os
import sys

# The library ships inside the pack. Appended, never prepended: ComfyUI has a top-level module
# called `nodes` that our `nodes/` package must not shadow.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

# ComfyUI imports the pack as a package. Loaded as a lone file instead (pytest does so when the
# clone's folder name is not an identifier, e.g. "comfyui-echodistill"), there is nothing to register.
if __package__:
    from .nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]
