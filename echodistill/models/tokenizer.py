"""The CLIP tokenizer shared by teacher and student, loaded offline.

SD 1.x, SD 2.x and SD-Turbo use the same CLIP BPE (49408 tokens, 77 positions); they differ
only in the pad token, which changes what the text encoder sees after the end token. The
vocabulary ships in ``assets/clip_tokenizer/`` (built by ``scripts/build_clip_tokenizer.py``),
so no model download is needed just to tokenize a prompt.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Literal, Sequence

import torch

from transformers import CLIPTokenizer

from ..errors import TokenizerError

TokenizerStyle = Literal["sd2", "sd1"]

# style -> pad token. SD 2.x / SD-Turbo pad with "!" (id 0), as their diffusers tokenizer
# configs do; SD 1.5 pads with the end token (id 49407). Using the wrong one shifts every
# padded position of the text encoder output, which the UNet was trained on. Side effect,
# shared with diffusers: as a special token "!" is always split out, so "!!" is 0, 0 in sd2.
TOKENIZER_STYLES: dict[str, str] = {
    "sd2": "!",
    "sd1": "<|endoftext|>",
}

CLIP_MAX_LENGTH = 77  # positions in every SD CLIP text encoder
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
_REQUIRED_FILES = ("vocab.json", "merges.txt")


def load_clip_tokenizer(
    style: TokenizerStyle = "sd2",
    folder: str | os.PathLike | None = None,
) -> CLIPTokenizer:
    """A CLIP tokenizer padded the way ``style`` expects, from local files only.

    ``folder`` is a tokenizer folder (e.g. a diffusers model's ``tokenizer/``) to read instead
    of the shipped vocabulary; ``style`` still decides the pad token, so one call gives the same
    ids whichever copy of the vocabulary is used. Each call returns a new instance: callers add
    concept tokens to it, and a shared cached one would leak them between runs.
    """
    if style not in TOKENIZER_STYLES:
        raise TokenizerError(
            f"unknown tokenizer style {style!r}; valid styles: {sorted(TOKENIZER_STYLES)}"
        )
    source = ASSET_DIR if folder is None else Path(folder)
    missing = [name for name in _REQUIRED_FILES if not (source / name).is_file()]
    if missing:
        raise TokenizerError(
            f"tokenizer folder {str(source)!r} lacks {', '.join(missing)}; "
            "pass a CLIP tokenizer folder such as a diffusers model's 'tokenizer/'"
        )
    try:
        # Everything is passed explicitly so a folder's own tokenizer_config.json cannot
        # change the padding; from_pretrained (not the constructor) because transformers 4.x
        # takes file paths there and 5.x takes the parsed vocab.
        return CLIPTokenizer.from_pretrained(
            str(source),
            local_files_only=True,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=TOKENIZER_STYLES[style],
            model_max_length=CLIP_MAX_LENGTH,
        )
    except Exception as exc:  # noqa: BLE001 - tokenizers' Rust side raises bare Exception on a bad vocab
        raise TokenizerError(f"cannot load the CLIP tokenizer in {str(source)!r}: {exc}") from exc


def token_ids(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, 77) of `prompts`, padded to 77 and cut there (a warning names a prompt over 75 tokens):
    what training feeds a text encoder."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, 77)
    if ids.shape[0] and bool((ids[:, -1] != tokenizer.pad_token_id).any()):
        for prompt in prompts:
            if len(tokenizer(prompt, add_special_tokens=False).input_ids) > tokenizer.model_max_length - 2:
                warnings.warn(f"the prompt {prompt[:60]!r}... is longer than {tokenizer.model_max_length - 2} tokens; "
                              "training reads only its first 75 tokens", stacklevel=3)
    return ids


COMFYUI_MAX_WORD_LENGTH = 8  # ComfyUI keeps a group shorter than this whole in one chunk


def prompt_chunks(tokenizer: CLIPTokenizer, prompt: str) -> list[list[int]]:
    """The 77-token windows ComfyUI's CLIPTextEncode feeds the text encoder for `prompt`.

    ComfyUI (comfy/sd1_clip.py ``tokenize_with_weights``) tokenizes the text between
    embeddings as one group and each embedding as a group of its own, then fills windows of
    start + 75 tokens + end (+ padding): a group of 8 tokens or more is cut at the window's
    edge, a shorter one moves whole to the next window. Our concept tokens stand where ComfyUI
    reads ``embedding:NAME``, so they are groups of their own here. ComfyUI's weight syntax
    ``(word:1.2)`` is not interpreted (prompts with parentheses may differ).
    """
    length = tokenizer.model_max_length
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    added = sorted((t for t in tokenizer.get_added_vocab() if t not in tokenizer.all_special_tokens),
                   key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, added)) + ")", prompt) if added else [prompt]
    groups = [tokenizer(part, add_special_tokens=False).input_ids for part in parts if part.strip()]
    windows: list[list[int]] = []
    window = [start]
    for group in groups:
        large = len(group) >= COMFYUI_MAX_WORD_LENGTH
        while group:
            if len(group) + len(window) > length - 1:
                room = length - 1 - len(window)
                if large:
                    window += group[:room]
                    group = group[room:]
                window.append(end)
                window += [pad] * (length - len(window))
                windows.append(window)
                window = [start]
            else:
                window += group
                group = []
    window.append(end)
    window += [pad] * (length - len(window))
    windows.append(window)
    return windows
