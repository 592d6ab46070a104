"""The CLIP tokenizer shared by teacher and student, loaded offline.

SD 1.x, SD 2.x and SD-Turbo use the same CLIP BPE (49408 tokens, 77 positions); they differ
only in the pad token, which changes what the text encoder sees after the end token. The
vocabulary ships in ``assets/clip_tokenizer/`` (built by ``scripts/build_clip_tokenizer.py``),
so no model download is needed just to tokenize a prompt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

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
