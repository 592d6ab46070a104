"""The concept token: added to the shared tokenizer, initialised, and the only row that trains."""

from __future__ import annotations

import pytest
import torch

from echodistill.errors import ConceptTokenError
from echodistill.models.concept import (
    ConceptEmbedding,
    add_concept_token,
    concept_embedding,
    concept_parameters,
    set_concept_row,
)
from echodistill.models.pair import load_model_pair


@pytest.fixture
def pair(tiny_pair_folders):
    return load_model_pair(*tiny_pair_folders)


def _ids(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_token_is_added_and_tokenized_as_one_id(pair):
    concept = add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    assert concept.token_id == 49408
    assert len(pair.tokenizer) == 49409
    ids = pair.tokenizer("a photo of <v*> dog").input_ids
    assert ids == [49406, 320, 1125, 539, 49408, 1929, 49407]
    assert pair.text_encoder.get_input_embeddings().num_embeddings == 49409


def test_row_starts_from_the_initializer(pair):
    table = pair.text_encoder.get_input_embeddings().weight.detach().clone()
    concept = add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    assert concept.initializer_ids == (1929,)
    assert torch.equal(concept_embedding(pair.text_encoder).concept_row, table[1929])


def test_multi_token_initializer_is_the_mean(pair):
    table = pair.text_encoder.get_input_embeddings().weight.detach().clone()
    concept = add_concept_token(pair.tokenizer, pair.text_encoder, "<toy>", "teddy bear")
    assert len(concept.initializer_ids) == 2
    expected = table[list(concept.initializer_ids)].mean(dim=0)
    assert torch.allclose(concept_embedding(pair.text_encoder).concept_row, expected)


def test_only_the_concept_row_changes_after_an_optimizer_step(pair):
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    before = {k: v.clone() for k, v in pair.text_encoder.state_dict().items()}
    row_before = concept_embedding(pair.text_encoder).concept_row.detach().clone()
    trainable = [p for p in pair.text_encoder.parameters() if p.requires_grad]
    assert trainable == concept_parameters(pair.text_encoder)

    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)  # decay would touch any row it saw
    hidden = pair.text_encoder(_ids(pair.tokenizer, "a photo of <v*> dog")).last_hidden_state
    hidden.pow(2).mean().backward()
    optimizer.step()

    for name, tensor in pair.text_encoder.state_dict().items():
        if name.endswith("concept_row"):
            continue
        assert torch.equal(tensor, before[name]), name
    assert not torch.equal(concept_embedding(pair.text_encoder).concept_row, row_before)


def test_concept_row_changes_only_prompts_that_use_it(pair):
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    with torch.no_grad():
        plain_before = pair.text_encoder(_ids(pair.tokenizer, "a photo of a dog")).last_hidden_state
        concept_before = pair.text_encoder(_ids(pair.tokenizer, "a photo of <v*> dog")).last_hidden_state
        set_concept_row(pair.text_encoder, torch.randn(32))
        plain_after = pair.text_encoder(_ids(pair.tokenizer, "a photo of a dog")).last_hidden_state
        concept_after = pair.text_encoder(_ids(pair.tokenizer, "a photo of <v*> dog")).last_hidden_state
    assert torch.equal(plain_before, plain_after)
    assert not torch.allclose(concept_before, concept_after)


def test_row_stays_fp32_in_a_half_precision_encoder(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders, dtype="bf16")
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    module = concept_embedding(pair.text_encoder)
    assert isinstance(module, ConceptEmbedding)
    assert module.concept_row.dtype == torch.float32
    out = pair.text_encoder(_ids(pair.tokenizer, "<v*>")).last_hidden_state
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "the concept token is empty: pick a new word such as '<v\\*>'"),
        ("my dog", "contains whitespace: pick one word"),
        ("\t", "contains whitespace"),
        ("dog", "'dog' already exists in the vocabulary \\(id 1929\\).*pick a new string such as '<dog>'"),
        ("sks", "'sks' already exists in the vocabulary \\(id 48136\\)"),
    ],
)
def test_bad_tokens_are_refused_with_advice(pair, token, message):
    with pytest.raises(ConceptTokenError, match=message):
        add_concept_token(pair.tokenizer, pair.text_encoder, token, "dog")
    assert len(pair.tokenizer) == 49408  # nothing was half-added


def test_bad_initializer_and_double_add(pair):
    with pytest.raises(ConceptTokenError, match="initializer word '  ' has no tokens"):
        add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "  ")
    add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    with pytest.raises(ConceptTokenError, match="already exists in the vocabulary"):
        add_concept_token(pair.tokenizer, pair.text_encoder, "<v*>", "dog")
    with pytest.raises(ConceptTokenError, match="does not fit a 32-wide text encoder"):
        set_concept_row(pair.text_encoder, torch.zeros(16))
