"""Speed options of the samplers: prompt-embedding cache, channels-last, fused self-attention QKV,
torch.compile and CUDA-graph capture of the one-step student.

    options = SamplerOptions(channels_last=True, fuse_qkv=True, cuda_graph=True)
    sample_student(pair, prompts, seeds=0, options=options)

Every option leaves the results equal (fp32: to round-off; `tests/test_sampling_speed.py`) and
leaves the shared models usable by training afterwards: channels-last only changes strides,
fused projections are switched on for the duration of a call and only where no adapter wraps
the projections, compiled and captured callables live beside the UNet, never inside it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from ..errors import EchoDistillError


class SamplerOptionsError(EchoDistillError, ValueError):
    """A speed option cannot be used on this device or with these models."""


@dataclass(frozen=True)
class SamplerOptions:
    cache_prompts: bool = field(default=True, metadata={
        "help": "reuse prompt embeddings while the prompt, tokenizer and text-encoder weights (concept row "
                "included) are unchanged"})
    channels_last: bool = field(default=False, metadata={
        "help": "NHWC memory layout for the UNet and VAE convolutions (faster on tensor-core GPUs)"})
    fuse_qkv: bool = field(default=False, metadata={
        "help": "self-attention q/k/v as one matmul; cross-attention stays unfused since its K/V carry the concept"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the student UNet; the first call per shape compiles (tens of seconds on a GPU)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend"})
    compile_mode: str | None = field(default=None, metadata={
        "help": "torch.compile mode, e.g. 'max-autotune-no-cudagraphs'; None: torch's default"})
    cuda_graph: bool = field(default=False, metadata={
        "help": "capture the one-step student in a CUDA graph per (batch, size, dtype); CUDA only, 1 step only"})

    def __post_init__(self):
        if self.compile and self.cuda_graph:
            raise SamplerOptionsError(
                "compile=True and cuda_graph=True: pick one (torch.compile's mode='reduce-overhead' captures "
                "CUDA graphs itself)", parameters=("compile", "cuda_graph"))


# --- prompt embeddings -------------------------------------------------------------------------

PROMPT_CACHE_SIZE = 64  # prompts per text encoder: 64 x 77 x 1024 x 4 B = 20 MB at most in fp32


def encoder_state(tokenizer, text_encoder) -> tuple:
    """What prompt embeddings depend on besides the prompt: changes whenever any of it changes.

    Each parameter's storage and in-place version counter: an optimizer step, `set_concept_row`,
    a resume or a swapped embedding module all change it, without hashing any weights. Plus the
    tokenizer (a new token re-tokenizes), the autocast state and the device.
    """
    device_type = text_encoder.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    weights = tuple((p.data_ptr(), version_counter(p), p.dtype) for p in text_encoder.parameters())
    return (id(tokenizer), len(tokenizer), str(text_encoder.device), autocast, torch.is_grad_enabled(), weights)


class _Untracked:
    """Stands for the version of a tensor that has none: equal to nothing, so a cache keyed on it never hits."""

    def __eq__(self, other):
        return False

    def __hash__(self):
        return id(self)


def version_counter(tensor: torch.Tensor) -> object:
    """The in-place version counter of `tensor`, or a never-equal marker for an inference tensor.

    Tensors made under `torch.inference_mode()` (a pair loaded, or a concept applied, inside a ComfyUI
    node or a user's `with torch.inference_mode():`) track no version ("Inference tensors do not track
    version counter"): whatever reads them is recomputed instead of cached.
    """
    if tensor.is_inference():
        return _Untracked()
    return tensor._version


class PromptCache:
    """Least-recently-used prompt embeddings (77·k, D) of one text encoder, on its device."""

    def __init__(self, capacity: int = PROMPT_CACHE_SIZE):
        self.capacity = capacity
        self.state: tuple | None = None
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, prompts: list[str], state: tuple,
               encode: Callable[[list[str]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Each prompt's (77·k, D); calls `encode` once, on the prompts not cached under `state`."""
        if state != self.state:
            self.state, self.entries = state, OrderedDict()
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        if missing:
            for prompt, embeds in zip(missing, encode(missing)):
                self.entries[prompt] = embeds  # (77·k, D)
        for prompt in prompts:
            self.entries.move_to_end(prompt)
        result = [self.entries[p] for p in prompts]
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return result


_PROMPT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_cache(text_encoder) -> PromptCache:
    """The cache that belongs to this text encoder (dropped with it)."""
    if text_encoder not in _PROMPT_CACHES:
        _PROMPT_CACHES[text_encoder] = PromptCache()
    return _PROMPT_CACHES[text_encoder]


# --- module layout ---------------------------------------------------------------------------------

def to_channels_last(*modules: torch.nn.Module) -> None:
    """NHWC weights for every convolution; values unchanged, so training can use the modules as they are."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def _fusable_self_attention(unet) -> list[Attention]:
    # Plain Linear projections only: a LoRA or delta wrapper would be bypassed by a fused copy.
    return [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention
            and all(type(getattr(m, name)) is torch.nn.Linear for name in ("to_q", "to_k", "to_v"))]


def _weights_version(module: Attention) -> tuple:
    return tuple((p.data_ptr(), version_counter(p)) for name in ("to_q", "to_k", "to_v")
                 for p in getattr(module, name).parameters())


@contextlib.contextmanager
def fused_self_attention(unet) -> Iterator[int]:
    """Self-attention layers run one fused QKV matmul inside the block; yields how many were fused.

    The fused weight is built once per layer and rebuilt only when a projection's weights
    change; the layers' own processors come back on exit.
    """
    modules = _fusable_self_attention(unet)
    saved = [m.processor for m in modules]
    try:
        for module in modules:
            if getattr(module, "_echodistill_fused_version", None) != _weights_version(module):
                module.fuse_projections()  # builds module.to_qkv from to_q/to_k/to_v
                module._echodistill_fused_version = _weights_version(module)
            module.set_processor(FusedAttnProcessor2_0())
        yield len(modules)
    finally:
        for module, processor in zip(modules, saved):
            module.set_processor(processor)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(unet, backend: str = "inductor", mode: str | None = None):
    """torch.compile(unet), made once per UNet and settings; attribute reads reach the UNet itself."""
    key = (backend, mode)
    per_unet = _COMPILED.setdefault(unet, {})
    if key not in per_unet:
        per_unet[key] = torch.compile(unet, backend=backend, mode=mode, dynamic=False)
    return per_unet[key]


# --- CUDA graphs -----------------------------------------------------------------------------------

class CapturedCall:
    """One function of fixed-shape tensors captured in a CUDA graph, replayed on copies of its inputs.

    Replaying launches the whole UNet as one graph: no Python or kernel-launch overhead per
    layer, which is what dominates a one-step sampler at small batches. The output tensor is
    the graph's own buffer: clone it before the next replay.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *example_inputs: torch.Tensor, warmup: int = 2):
        self.inputs = [x.clone() for x in example_inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output


_CAPTURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_cuda_graph(device: torch.device, steps: int, guided: bool) -> None:
    if device.type != "cuda":
        raise SamplerOptionsError(
            f"cuda_graph=True needs the models on a CUDA device; they are on {device.type}. "
            "Leave it off here (it only removes GPU kernel-launch overhead)", parameters=("cuda_graph",))
    if steps != 1 or guided:
        raise SamplerOptionsError(
            f"cuda_graph=True captures the one-step student only (steps=1, guidance <= 1); got steps={steps}"
            f"{' with guidance' if guided else ''}", parameters=("cuda_graph", "steps"))


def captured_student(unet, key: tuple, fn: Callable[..., torch.Tensor], *example_inputs) -> CapturedCall:
    """The capture of `fn` for this UNet and `key` (shapes, dtypes, timestep, autocast): made once.

    A capture bakes in the UNet's weights by address, so in-place updates (training, a new
    concept row in the embeddings) are seen; replacing a module is part of `key`.
    """
    per_unet = _CAPTURED.setdefault(unet, {})
    if key not in per_unet:
        per_unet[key] = CapturedCall(fn, *example_inputs)
    return per_unet[key]


def module_identity(unet) -> tuple:
    """Changes when a layer of `unet` is replaced or wrapped (e.g. an adapter added or removed)."""
    return tuple(id(p) for p in unet.parameters())
