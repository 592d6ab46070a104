"""A pair borrowed for training or concept sampling comes back exactly as it was."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from echodistill.errors import EchoDistillError
from echodistill.models.adapters import adapter_kind
from echodistill.models.concept import ConceptEmbedding
from echodistill.models.pair import load_model_pair
from echodistill.models.pristine import pristine
from echodistill.sampling.samplers import sample_student
from echodistill.training.config import TrainConfig
from echodistill.training.data import load_concept_images
from echodistill.training.trainer import Trainer


def _state(pair):
    modules = {"teacher": pair.teacher.unet, "student": pair.student.unet, "text": pair.text_encoder}
    return {f"{k}.{n}": v.clone() for k, m in modules.items() for n, v in m.state_dict().items()}


def test_training_twice_on_one_pair_leaves_it_pristine(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    before = _state(pair)
    baseline = sample_student(pair, ["a photo of a dog"], seeds=[3], width=64, height=64).latents
    images = load_concept_images([Image.new("RGB", (64, 64), (200, 30, 30))] * 3, resolution=64)
    config = TrainConfig(steps=1, resolution=64, class_word="dog", echo=False, sample_every=0, save_every=0,
                         adapter="lora", gradient_checkpointing=True)
    bundles = []
    for _ in range(2):  # a second run would fail on a leftover token or adapter
        with pristine(pair):
            bundles.append(Trainer(pair, images, config).train())
    assert torch.equal(bundles[0].embedding, bundles[1].embedding)
    with pristine(pair):
        bundles[0].apply(pair)
        assert adapter_kind(pair.student.unet) == "lora"
    after = _state(pair)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert len(pair.tokenizer) == 49408 and adapter_kind(pair.teacher.unet) is None
    assert not pair.student.unet.is_gradient_checkpointing
    again = sample_student(pair, ["a photo of a dog"], seeds=[3], width=64, height=64).latents
    assert torch.equal(again, baseline)


def test_a_pair_adapted_in_place_is_refused_with_a_clear_error_and_left_as_it_is(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    images = load_concept_images([Image.new("RGB", (64, 64), (20, 200, 30))] * 2, resolution=64)
    config = TrainConfig(steps=1, resolution=64, class_word="dog", echo=False, sample_every=0, save_every=0)
    Trainer(pair, images, config).train()  # outside pristine: the pair keeps the token and the K/V deltas
    tokens = len(pair.tokenizer)
    with pytest.raises(EchoDistillError, match="already carries a trained concept \\(teacher, student, text encoder"):
        with pristine(pair):
            pytest.fail("entered the borrow")
    assert len(pair.tokenizer) == tokens and adapter_kind(pair.student.unet) == "custom_diffusion"
    assert isinstance(pair.text_encoder.get_input_embeddings(), ConceptEmbedding)
