"""Build the shipped CLIP tokenizer files from OpenCLIP's BPE list, offline.

SD 1.x, SD 2.x and SD-Turbo all tokenize with the same CLIP BPE; OpenCLIP ships it as one
gzipped merge list (``open_clip/bpe_simple_vocab_16e6.txt.gz``), while ``transformers``
wants ``vocab.json`` + ``merges.txt``. This script converts the first into the second, so the
library never has to download a tokenizer from the Hub.

    python scripts/build_clip_tokenizer.py                      # installed open_clip package
    python scripts/build_clip_tokenizer.py open_clip_torch-3.3.0-py3-none-any.whl
    python scripts/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz --out some/folder

Only the standard library is used, so it runs before the package (or torch) is installed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echodistill.files import atomic_write_text  # noqa: E402  (torch-free)

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenCLIP keeps a 49152-entry budget for bytes + merges, minus 256 for the "</w>" bytes and
# 2 for the start/end tokens; lines past that in the file are never used.
CLIP_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"  # OpenCLIP calls it <start_of_text>; HF and diffusers use this
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "echodistill" / "assets" / "clip_tokenizer"


def byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255, in CLIP's vocabulary order.

    Bytes that are already visible, non-space characters stand for themselves and come first,
    in byte order; every other byte is given the next unused code point from 256 upwards,
    again in byte order. The order matters: it fixes ids 0..255 (id 0 is "!").
    """
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    visible_set = set(visible)
    hidden = [b for b in range(256) if b not in visible_set]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def read_bpe_text(source: str | os.PathLike) -> str:
    """Text of the gzipped BPE list, from a ``.txt.gz`` file or from inside an open_clip wheel."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"BPE source {str(path)!r} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            try:
                packed = wheel.read(BPE_MEMBER)
            except KeyError:
                raise FileNotFoundError(
                    f"{str(path)!r} has no {BPE_MEMBER!r}; pass an open-clip-torch wheel"
                ) from None
        return gzip.decompress(packed).decode("utf-8")
    with gzip.open(path, "rb") as fh:
        return fh.read().decode("utf-8")


def find_installed_bpe() -> Path:
    """The BPE file of an installed ``open_clip`` package, located without importing it
    (importing open_clip pulls in torch and timm just to read one data file)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; pass the path of an open-clip-torch wheel or of "
            f"{BPE_FILENAME} (e.g. `pip download --no-deps open-clip-torch -d /tmp/oc`)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the installed open_clip package has no {BPE_FILENAME}")


def build_vocab_and_merges(
    bpe_text: str, num_merges: int = CLIP_NUM_MERGES
) -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id map and its ranked merges, from the text of OpenCLIP's BPE list.

    Ids follow OpenCLIP: 256 byte chars, the same with "</w>", one token per merge in rank
    order, then the start and end tokens. ``num_merges`` exists so tests can use a tiny file.
    """
    # Not splitlines(): that would also split on U+0085 and kin. A final newline is no merge.
    lines = bpe_text.rstrip("\n").split("\n")
    merge_lines = lines[1 : num_merges + 1]  # line 0 is a version header
    if len(merge_lines) < num_merges:
        raise ValueError(f"BPE list has {len(merge_lines)} merges after its header, need {num_merges}")

    merges: list[tuple[str, str]] = []
    for rank, line in enumerate(merge_lines):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"BPE merge {rank} (file line {rank + 2}) is {line!r}, want two tokens")
        merges.append((parts[0], parts[1]))

    chars = byte_unicode_chars()
    tokens = chars + [c + END_OF_WORD for c in chars] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # A repeated merge result would silently shift every later id.
        raise ValueError(f"BPE list yields {len(tokens) - len(vocab)} duplicate tokens")
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(vocab: dict[str, int], merges: list[str], out_dir: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in the layout ``CLIPTokenizer`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One compact line of UTF-8 rather than \u escapes: ~10% smaller, and every token stays legible.
    text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
    # through a temp file, with the mode a plain open() gives (the pack's own writer)
    atomic_write_text(out / "vocab.json", text + "\n")
    atomic_write_text(out / "merges.txt", "\n".join([MERGES_HEADER, *merges]) + "\n")


def build_clip_tokenizer(
    source: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT,
    num_merges: int = CLIP_NUM_MERGES,
) -> dict[str, int]:
    """Read the BPE list (wheel, ``.txt.gz`` or installed open_clip), write the files, return the vocab."""
    bpe_text = read_bpe_text(source if source is not None else find_installed_bpe())
    vocab, merges = build_vocab_and_merges(bpe_text, num_merges)
    write_tokenizer_files(vocab, merges, out_dir)
    return vocab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        nargs="?",
        help=f"open-clip-torch wheel or {BPE_FILENAME}; default: the installed open_clip package",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for vocab.json and merges.txt")
    args = parser.parse_args(argv)
    try:
        vocab = build_clip_tokenizer(args.source, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(vocab)} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
