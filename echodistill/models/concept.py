"""The concept token: one new word in the shared tokenizer(s) whose embedding row(s) alone are trained.

The embedding table stays frozen. `ConceptEmbedding` wraps it and substitutes a separate
trainable row wherever the concept's id appears, so an optimizer (weight decay included) can
only ever touch that row: every other row is unchanged by construction, not by masking.

SDXL has two shared text encoders: the token is added to both tokenizers and gets a row in each
(768 wide in CLIP ViT-L, 1280 in OpenCLIP ViT-bigG): `add_concept_tokens`, `concept_rows`,
`set_concept_rows`, `own_concept_embeddings` and `reading_with_all` take every encoder at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import AddedToken, CLIPTextModel, CLIPTokenizer

from ..errors import ConceptTokenError

DEFAULT_TOKEN = "<v*>"


@dataclass(frozen=True)
class ConceptToken:
    token: str
    token_id: int
    initializer: str
    initializer_ids: tuple[int, ...]


class ConceptEmbedding(nn.Module):
    """A frozen token-embedding table plus one trainable row for the concept token."""

    def __init__(self, table: nn.Embedding, token_id: int, row: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.token_id = token_id
        # fp32 master copy: an lr of 1e-5 would vanish in a bf16 row.
        self.concept_row = nn.Parameter(row.detach().to(torch.float32).clone())  # (D,)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)  # (B, L, D)
        is_concept = (input_ids == self.token_id).unsqueeze(-1)  # (B, L, 1)
        return torch.where(is_concept, self.concept_row.to(embeds.dtype), embeds)


def validate_token(tokenizer: CLIPTokenizer, token: str) -> None:
    if not token:
        raise ConceptTokenError(f"the concept token is empty: pick a new word such as {DEFAULT_TOKEN!r}")
    if any(ch.isspace() for ch in token):
        raise ConceptTokenError(
            f"the concept token {token!r} contains whitespace: pick one word such as {DEFAULT_TOKEN!r}"
        )
    vocab = tokenizer.get_vocab()
    for form in (token + "</w>", token.lower() + "</w>", token):  # the whole-word form first
        if form in vocab:
            raise ConceptTokenError(
                f"{token!r} already exists in the vocabulary (id {vocab[form]}), so it already means "
                f"something: pick a new string such as '<{token.strip('<>')}>' or {DEFAULT_TOKEN!r}"
            )


def add_concept_token(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    token: str = DEFAULT_TOKEN,
    initializer: str = "object",
) -> ConceptToken:
    """Add `token` to the tokenizer and encoder; its row starts as the mean of `initializer`'s rows."""
    validate_token(tokenizer, token)
    initializer_ids = tuple(tokenizer(initializer, add_special_tokens=False).input_ids)
    if not initializer.strip() or not initializer_ids:
        raise ConceptTokenError(
            f"the initializer word {initializer!r} has no tokens: give the subject's class word, e.g. 'dog'"
        )
    # normalized=False: the exact string the user types (case included) is what matches.
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False)])
    token_id = tokenizer.convert_tokens_to_ids(token)

    table = text_encoder.get_input_embeddings()
    if isinstance(table, ConceptEmbedding):
        raise ConceptTokenError("this text encoder already carries a concept token; load a fresh one")
    with torch.no_grad():
        init_row = table.weight[list(initializer_ids)].float().mean(dim=0)  # (D,)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[token_id] = init_row.to(table.weight.dtype)
    text_encoder.set_input_embeddings(ConceptEmbedding(table, token_id, init_row))
    return ConceptToken(token, token_id, initializer, initializer_ids)


def concept_embedding(text_encoder: CLIPTextModel) -> ConceptEmbedding:
    module = text_encoder.get_input_embeddings()
    if not isinstance(module, ConceptEmbedding):
        raise ConceptTokenError("this text encoder has no concept token; call add_concept_token first")
    return module


def concept_parameters(text_encoder: CLIPTextModel) -> list[nn.Parameter]:
    """The only text-encoder parameters that training may update."""
    return [concept_embedding(text_encoder).concept_row]


def set_concept_row(text_encoder: CLIPTextModel, row: torch.Tensor) -> None:
    """Load a trained row (e.g. from a ConceptBundle) into the concept slot."""
    module = concept_embedding(text_encoder)
    if row.shape != module.concept_row.shape:
        raise ConceptTokenError(
            f"embedding row of shape {tuple(row.shape)} does not fit a {module.embedding_dim}-wide text encoder"
        )
    with torch.no_grad():
        module.concept_row.copy_(row.to(module.concept_row))


def own_concept_embedding(text_encoder: CLIPTextModel) -> ConceptEmbedding:
    """A second concept row over the same frozen table, starting where the encoder's row is now.

    Every other weight of the encoder is frozen, so an encoder that differs only in this row
    is a separate copy of it, without duplicating its weights (1.4 GB for SD 2.1's in fp32).
    """
    shared = concept_embedding(text_encoder)
    return ConceptEmbedding(shared.table, shared.token_id, shared.concept_row)


@contextlib.contextmanager
def reading_with(text_encoder: CLIPTextModel, embedding: ConceptEmbedding | None) -> Iterator[None]:
    """Encode prompts with `embedding`'s concept row for the duration (None: the encoder's own)."""
    if embedding is None:
        yield
        return
    own = concept_embedding(text_encoder)
    if embedding.token_id != own.token_id or embedding.table is not own.table:
        raise ConceptTokenError("this concept row belongs to another text encoder or another token")
    text_encoder.set_input_embeddings(embedding)
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(own)


# --- every text encoder of a pair at once (SDXL has two: the token lives in both) ---------------------

def add_concept_tokens(
    tokenizers: Sequence[CLIPTokenizer],
    text_encoders: Sequence[CLIPTextModel],
    token: str = DEFAULT_TOKEN,
    initializer: str = "object",
) -> tuple[ConceptToken, ...]:
    """`add_concept_token` for each tokenizer/encoder pair, in order: one trainable row per encoder
    (SDXL: a 768-wide row in CLIP ViT-L and a 1280-wide row in OpenCLIP ViT-bigG), each started from
    its own table's rows of `initializer`. Every tokenizer is checked before any is changed, so a
    refused token leaves all of them as they were (ConceptTokenError)."""
    for tokenizer in tokenizers:
        validate_token(tokenizer, token)
    return tuple(add_concept_token(t, e, token, initializer) for t, e in zip(tokenizers, text_encoders))


def concept_rows(text_encoders: Sequence[CLIPTextModel]) -> list[nn.Parameter]:
    """The trainable concept rows of every encoder, in order: (D_1,), (D_2,), ..."""
    return [concept_embedding(encoder).concept_row for encoder in text_encoders]


def set_concept_rows(text_encoders: Sequence[CLIPTextModel], rows: Sequence[torch.Tensor]) -> None:
    """`set_concept_row` for every encoder; ConceptTokenError when the count or a width does not fit."""
    if len(rows) != len(text_encoders):
        raise ConceptTokenError(
            f"{len(rows)} embedding row(s) for {len(text_encoders)} text encoder(s): this concept was trained on "
            "another model family (SDXL concepts carry two rows, SD 1.x / 2.x concepts one)"
        )
    for encoder, row in zip(text_encoders, rows):
        set_concept_row(encoder, row)


def own_concept_embeddings(text_encoders: Sequence[CLIPTextModel]) -> tuple[ConceptEmbedding, ...]:
    """`own_concept_embedding` of every encoder: a separate row per encoder over the same frozen tables."""
    return tuple(own_concept_embedding(encoder) for encoder in text_encoders)


@contextlib.contextmanager
def reading_with_all(
    text_encoders: Sequence[CLIPTextModel], embeddings: Sequence[ConceptEmbedding] | None
) -> Iterator[None]:
    """`reading_with` for every encoder at once (None: each encoder's own row)."""
    if embeddings is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        for encoder, embedding in zip(text_encoders, embeddings, strict=True):
            stack.enter_context(reading_with(encoder, embedding))
        yield
