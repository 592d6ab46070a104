"""Read and write weight files safely: safetensors lazily, pickles only with weights_only."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import EchoDistillError, ModelLoadError
from ..files import atomic_write_bytes, atomic_write_text  # noqa: F401  (atomic_write_text: re-exported)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# safetensors' own words for a damaged header, and what they mean to a user
_SAFETENSORS_CAUSES = (("file not fully covered", "cut short: its tensors end before the header says"),
                       ("header too small", "cut short, or not a safetensors file"),
                       ("invalid header length", "not a safetensors file, or cut short within its header"),
                       ("deserializ", "its header is damaged"))


def open_safetensors(path: str | os.PathLike, error: type[EchoDistillError] = ModelLoadError,
                     advice: str = "copy it again from where it came from"):
    """`safe_open(path)` (usable in a `with`), or `error` in one line naming the file, what is wrong in words
    (cut short, not safetensors, damaged header; safetensors' own text last) and `advice`."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ... of its own
        raw = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        words = next((words for needle, words in _SAFETENSORS_CAUSES if needle in raw), "unreadable")
        raise error(f"{path} is not a readable safetensors file ({words}; safetensors says: {raw}): {advice}") from None


class TensorFile:
    """Random access to the tensors of one weight file, reading only what is asked for.

    `.safetensors` files are memory-mapped and read tensor by tensor, so asking for the UNet
    of a full checkpoint never touches its text tower. Pickled files (`.ckpt`, `.bin`) are
    loaded with `weights_only=True`, memory-mapped where the format allows.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"weight file not found: {self.path}")
        self._safe = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        if self.path.suffix == ".safetensors":
            self._safe = open_safetensors(self.path, advice="download or copy the model file again")
            self.metadata = dict(self._safe.metadata() or {})
            self._keys = list(self._safe.keys())
        elif self.path.suffix in PICKLE_SUFFIXES:
            self._tensors = _load_pickled_state_dict(self.path)
            self._keys = list(self._tensors)
        else:
            raise ModelLoadError(
                f"{self.path.name}: unsupported weight format {self.path.suffix!r}; "
                f"use .safetensors (preferred) or one of {', '.join(PICKLE_SUFFIXES)}"
            )

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_key_set_cache"):
            self._key_set_cache = set(self._keys)
        return self._key_set_cache

    def get(self, key: str) -> torch.Tensor:
        if key not in self:
            raise ModelLoadError(f"{self.path.name} has no tensor {key!r}")
        if self._safe is not None:
            return self._safe.get_tensor(key)
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safe is not None:
            return tuple(self._safe.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def rows(self, key: str, stop: int) -> torch.Tensor:
        """The first `stop` rows of a tensor, reading no more than those from a safetensors file."""
        if self._safe is not None:
            return self._safe.get_slice(key)[:stop]
        return self._tensors[key][:stop]


def _load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old zip-less pickles cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        cause = (str(exc).strip().splitlines() or [""])[0][:160]
        cause = f": {cause}" if cause and not cause.isdigit() else ""  # a bare number says nothing to a user
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint (truncated, damaged, or a pickle that is not plain "
            f"weights{cause}). Download it again, or convert it to .safetensors with a trusted tool"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path.name} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def folder_weight_files(folder: Path, stem: str) -> list[TensorFile]:
    """Every weight file of one diffusers/transformers component folder, opened (headers read, nothing loaded
    from a safetensors file). Raises ModelLoadError for no weights, a damaged file or a damaged shard index."""
    # transformers names its pickle pytorch_model.bin (SD 2.1 and older releases ship one); diffusers keeps the stem
    pickled = "pytorch_model" if stem == "model" else stem
    candidates = [f"{stem}{variant}{suffix}" for suffix in (".safetensors", ".safetensors.index.json")
                  for variant in ("", ".fp16")] + [f"{pickled}{variant}.bin" for variant in ("", ".fp16")]
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [TensorFile(path)]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path} is not a shard index (no weight_map): restore it from the model's "
                                 "release") from None
        return [TensorFile(folder / shard) for shard in shards]
    raise ModelLoadError(f"no weights in {folder}: expected one of {', '.join(candidates)}")


def read_folder_weights(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """The state dict of one diffusers/transformers component folder (single or sharded)."""
    state: dict[str, torch.Tensor] = {}
    for tf in folder_weight_files(folder, stem):
        state.update({k: tf.get(k) for k in tf.keys()})
    return state


def fingerprint(get: Callable[[str], torch.Tensor], names: Iterable[str]) -> str:
    """A short, dtype-independent hash of selected tensors (12 hex digits).

    Tensors are hashed as float16, so the same weights stored or loaded in fp32, fp16 or
    bf16-from-fp16 give the same fingerprint.
    """
    digest = hashlib.sha256()
    for name in names:
        tensor = get(name).detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:12]


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file through a temp file + rename, so a crash never leaves half a file.

    Serialized in memory first, then written by Python: a full disk is reported as such (OutputWriteError),
    not as an opaque error from the serializer.
    """
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    return atomic_write_bytes(path, data)
