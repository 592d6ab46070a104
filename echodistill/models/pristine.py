"""Borrow a loaded pair for one job and hand it back unchanged.

Training and concept sampling add a token to the tokenizer, swap the text encoder's embedding
module and wrap UNet layers with adapters. A UI that keeps one loaded pair for many jobs (as
ComfyUI caches a loader's output) needs each job to leave no trace: `pristine(pair)` records
what those steps replace and puts it back on exit, without copying any weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

from ..errors import EchoDistillError
from .adapters import adapter_kind, remove_adapters
from .concept import ConceptEmbedding
from .pair import ModelPair


@contextlib.contextmanager
def pristine(pair: ModelPair) -> Iterator[ModelPair]:
    _check_unadapted(pair)
    tokenizers = [copy.deepcopy(t) for t in pair.tokenizers]  # small: the vocabulary, not weights
    # Per text encoder (SDXL: two). Resizing may grow the same module in place (new .data), so keep the tensor too.
    saved = []
    for encoder in pair.text_encoders:
        embeddings = encoder.get_input_embeddings()
        saved.append(
            (encoder, embeddings, embeddings.weight.data, embeddings.num_embeddings, encoder.config.vocab_size))
    try:
        yield pair
    finally:
        for unet in (pair.teacher.unet, pair.student.unet):
            remove_adapters(unet)
            if unet.is_gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.requires_grad_(False)
        if pair.vae.is_gradient_checkpointing:  # the trainer's gradient_checkpointing covers the VAE decoder
            pair.vae.disable_gradient_checkpointing()
        for encoder, embeddings, table, rows, vocab_size in saved:
            embeddings.weight.data, embeddings.num_embeddings = table, rows
            encoder.set_input_embeddings(embeddings)
            encoder.config.vocab_size = vocab_size
            encoder.requires_grad_(False)
        pair.tokenizer = tokenizers[0]
        if len(tokenizers) > 1:
            pair.tokenizer_2 = tokenizers[1]


def _check_unadapted(pair: ModelPair) -> None:
    """Only a base pair can be handed back as it was: one adapted in place has nothing to return to."""
    adapted = [name for name, unet in (("teacher", pair.teacher.unet), ("student", pair.student.unet))
               if adapter_kind(unet) is not None]
    if any(isinstance(e.get_input_embeddings(), ConceptEmbedding) for e in pair.text_encoders):
        adapted.append("text encoder (concept token)")
    if adapted:
        raise EchoDistillError(
            f"this pair already carries a trained concept ({', '.join(adapted)}), applied in place outside "
            "pristine(pair): load a fresh pair, or train and apply concepts inside `with pristine(pair):`"
        )
