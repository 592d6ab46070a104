"""The demo's outputs are pinned: the same seed trains the same bundle and draws the same sheet.

The hashes were taken from a two-step run of `echodistill demo` on the shipped mini world. A change
that moves code around must leave them as they are; a change meant to alter training or sampling
updates them, and says why in its commit.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from echodistill.cli import main

BUNDLE_TENSORS_SHA256 = "f801e45e234e6303bd29b482a6ca31fb09b6f27a4caf70b7e0e54c761be03b02"
CONTACT_SHEET_SHA256 = "cc8629ac74309dbd52764c98581cd7de82f5f19ae505d08c8edee7c67e8895ce"


def tensors_digest(path) -> str:
    """sha256 over every tensor of a safetensors file: name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as tensors:
        for name in sorted(tensors.keys()):
            tensor = tensors.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixels_digest(path) -> str:
    with Image.open(path) as sheet:
        return hashlib.sha256(np.asarray(sheet.convert("RGB")).tobytes()).hexdigest()


def test_demo_bundle_and_sheet_are_the_same_for_the_same_seed(tmp_path):
    assert main(["demo", "--steps", "2", "--concept", "window", "--seed", "0", "--out", str(tmp_path),
                 "--threads", "1"]) == 0
    assert tensors_digest(tmp_path / "window.safetensors") == BUNDLE_TENSORS_SHA256
    assert pixels_digest(tmp_path / "window_contact_sheet.png") == CONTACT_SHEET_SHA256
