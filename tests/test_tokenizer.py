"""The shipped CLIP tokenizer and the script that builds it from OpenCLIP's BPE list."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from echodistill.errors import TokenizerError
from echodistill.models.tokenizer import ASSET_DIR, TOKENIZER_STYLES, load_clip_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_clip_tokenizer.py"
PROMPT_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog"
# Header, three merges, then a line past the merge budget that the builder must ignore.
TINY_BPE = "#version: 0.2\ni n\nt h\nth e</w>\nin g</w>\n"


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    # scripts/ is not a package; load the file the way `python scripts/...` would run it.
    spec = importlib.util.spec_from_file_location("build_clip_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_gz(tmp_path: Path) -> Path:
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(gzip.compress(TINY_BPE.encode("utf-8")))
    return path


# --- the shipped tokenizer ---------------------------------------------------------------


@pytest.mark.parametrize("style", ["sd2", "sd1"])
def test_known_prompt_ids(style: str) -> None:
    tokenizer = load_clip_tokenizer(style)
    assert tokenizer("a photo of sks dog").input_ids == PROMPT_IDS


@pytest.mark.parametrize(("style", "pad_id"), [("sd2", 0), ("sd1", 49407)])
def test_pads_to_77_with_style_pad_token(style: str, pad_id: int) -> None:
    tokenizer = load_clip_tokenizer(style)
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token_id == pad_id
    batch = tokenizer(
        "a photo of sks dog", padding="max_length", max_length=tokenizer.model_max_length
    )
    assert batch.input_ids == PROMPT_IDS + [pad_id] * 70
    assert batch.attention_mask == [1] * 7 + [0] * 70


def test_long_prompt_is_truncated_to_77_and_still_ends() -> None:
    tokenizer = load_clip_tokenizer()
    ids = tokenizer("dog " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert set(ids[1:-1]) == {1929}


def test_sd2_splits_out_its_pad_token_like_diffusers() -> None:
    # "!" becomes a special token once it is the pad token, so SD 2.x never sees the merged
    # "!!</w>" (748) that SD 1.5 does; matching diffusers keeps prompts' ids identical.
    assert load_clip_tokenizer("sd2")("wow!!").input_ids == [49406, 2781, 0, 0, 49407]
    assert load_clip_tokenizer("sd1")("wow!!").input_ids == [49406, 2781, 748, 49407]


def test_vocabulary_size_and_special_ids() -> None:
    tokenizer = load_clip_tokenizer()
    assert len(tokenizer) == 49408
    special_ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special_ids == (49406, 49407, 49407)
    assert tokenizer.convert_tokens_to_ids(["!", "a</w>", "Ġ"]) == [0, 320, 220]


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("a photo of sks dog", "a photo of sks dog"),
        ("café au lait, 🐶", "café au lait , 🐶"),
        # CLIP lowercases and folds whitespace; every word decodes with one trailing space.
        ("A  Photo\tof SKS dog", "a photo of sks dog"),
    ],
)
def test_decode_round_trips(text: str, decoded: str) -> None:
    tokenizer = load_clip_tokenizer("sd1")
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == decoded


def test_styles_registry_names_each_pad_token() -> None:
    assert TOKENIZER_STYLES == {"sd2": "!", "sd1": "<|endoftext|>"}


def test_unknown_style_lists_valid_styles() -> None:
    with pytest.raises(TokenizerError, match=r"unknown tokenizer style 'sdxl'; valid styles: \['sd1', 'sd2'\]"):
        load_clip_tokenizer("sdxl")  # type: ignore[arg-type]


def test_folder_overrides_vocab_but_not_padding(tmp_path: Path) -> None:
    # An SD 1.5-style folder: its own config says pad with the end token and a huge length.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSET_DIR / name, tmp_path / name)
    config = {"pad_token": "<|endoftext|>", "model_max_length": 1000000}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_clip_tokenizer("sd2", folder=tmp_path)
    assert (tokenizer.pad_token_id, tokenizer.model_max_length) == (0, 77)


def test_folder_without_vocab_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"lacks vocab\.json, merges\.txt; pass a CLIP tokenizer folder"):
        load_clip_tokenizer(folder=tmp_path)


def test_corrupt_folder_raises_tokenizer_error(tmp_path: Path) -> None:
    shutil.copy(ASSET_DIR / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a":', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"cannot load the CLIP tokenizer in '.*'"):
        load_clip_tokenizer(folder=tmp_path)


def test_shipped_vocab_is_what_the_builder_derives_from_shipped_merges(builder: ModuleType) -> None:
    # merges.txt has the BPE list's shape (header + ranked merges), so it alone fixes every id.
    merges_text = (ASSET_DIR / "merges.txt").read_text(encoding="utf-8")
    shipped_vocab = json.loads((ASSET_DIR / "vocab.json").read_text(encoding="utf-8"))
    vocab, merges = builder.build_vocab_and_merges(merges_text)
    assert merges_text.startswith("#version: 0.2\n")
    assert len(merges) == 49152 - 256 - 2
    assert vocab == shipped_vocab


# --- the builder -------------------------------------------------------------------------


def test_byte_chars_are_256_distinct_and_start_with_visible_bytes(builder: ModuleType) -> None:
    chars = builder.byte_unicode_chars()
    assert len(set(chars)) == 256
    assert chars[:3] == ["!", '"', "#"]
    assert chars[93:95] == ["~", "¡"]  # 0x7F..0xA0 are hidden, so "~" is followed by "¡"
    assert chars[188] == chr(256)  # byte 0, the first hidden byte
    assert chars[188 + 32] == "Ġ"  # byte 32 (space), the 33rd hidden byte


def test_builder_orders_tiny_vocab_like_openclip(builder: ModuleType) -> None:
    vocab, merges = builder.build_vocab_and_merges(TINY_BPE, num_merges=3)
    assert merges == ["i n", "t h", "th e</w>"]
    assert len(vocab) == 256 + 256 + 3 + 2
    assert (vocab["!"], vocab["ÿ"], vocab["!</w>"], vocab["Ġ</w>"]) == (0, 187, 256, 476)
    tail = sorted(vocab, key=vocab.get)[512:]
    assert tail == ["in", "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    assert "ing</w>" not in vocab  # the merge past the budget


def test_builder_writes_loadable_files_from_gz(builder: ModuleType, tiny_gz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    vocab = builder.build_clip_tokenizer(tiny_gz, out, num_merges=3)
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]  # no temp files left
    assert (out / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\ni n\nt h\nth e</w>\n"
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == vocab
    # The tiny tokenizer applies the merges: "the" -> t h e</w> -> th e</w> -> the</w>.
    tokenizer = load_clip_tokenizer("sd2", folder=out)
    assert tokenizer("the").input_ids == [515, 514, 516]


def test_builder_reads_bpe_inside_a_wheel(builder: ModuleType, tiny_gz: Path, tmp_path: Path) -> None:
    wheel = tmp_path / "open_clip_torch-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gz, "open_clip/bpe_simple_vocab_16e6.txt.gz")
    assert builder.read_bpe_text(wheel) == TINY_BPE


def test_builder_refuses_wheel_without_bpe(builder: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(FileNotFoundError, match=r"has no 'open_clip/bpe_simple_vocab_16e6\.txt\.gz'"):
        builder.read_bpe_text(wheel)


def test_builder_refuses_short_or_malformed_bpe(builder: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"BPE list has 4 merges after its header, need 5"):
        builder.build_vocab_and_merges(TINY_BPE, num_merges=5)
    with pytest.raises(ValueError, match=r"BPE merge 1 \(file line 3\) is 'th', want two tokens"):
        builder.build_vocab_and_merges("#version: 0.2\ni n\nth\n", num_merges=2)


def test_builder_cli_reports_errors(builder: ModuleType, tiny_gz: Path, tmp_path: Path, capsys) -> None:
    assert builder.main([str(tmp_path / "missing.txt.gz"), "--out", str(tmp_path / "x")]) == 1
    assert "error: BPE source" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
