"""Student-only baselines on a tiny pair: each trains exactly its own parameters, and its bundle samples."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from echodistill.benchmarks.baselines import BASELINES, DREAMBOOTH_IDENTIFIER, StudentBaseline, baseline_config
from echodistill.concepts.bundle import ConceptBundle
from echodistill.errors import ConfigError
from echodistill.jobs.runs import sample
from echodistill.models.adapters import WeightDelta, adapter_state_dict
from echodistill.models.concept import concept_embedding
from echodistill.models.pair import load_model_pair
from echodistill.models.pristine import pristine
from echodistill.sampling.samplers import sample_student
from echodistill.training.data import load_concept_images


def _images():
    pictures = []
    for i in range(3):
        picture = Image.new("RGB", (64, 64), (30, 160, 40 * i))
        picture.paste((230, 200, 20), (12 + 4 * i, 20, 44 + 4 * i, 44))
        pictures.append(picture)
    return load_concept_images(pictures, resolution=64)


def _config(name: str, **changes):
    return baseline_config(name, **{"steps": 3, "batch_size": 2, "resolution": 64, "class_word": "dog", **changes})


def _snapshot(pair) -> dict[str, torch.Tensor]:
    """Every tensor of the pair's modules plus the trainable extras (adapters, the concept row)."""
    state = {}
    for owner, module in (("teacher", pair.teacher.unet), ("student", pair.student.unet), ("vae", pair.vae),
                          ("text", pair.text_encoder)):
        state.update({f"{owner}.{n}": p.detach().clone() for n, p in module.named_parameters()})
    return state


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_each_baseline_changes_only_what_it_trains(name, tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    baseline = StudentBaseline(pair, _images(), _config(name), name)
    before = _snapshot(pair)
    bundle = baseline.train()
    after = _snapshot(pair)
    assert before.keys() == after.keys() and bundle.step == 3
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    row = "text.embeddings.token_embedding.concept_row"
    expected = {
        "custom_diffusion": lambda k: k == row or (k.startswith("student.") and k.endswith(".delta")),
        "textual_inversion": lambda k: k == row,
        "dreambooth_lora": lambda k: k.startswith("student.") and "lora_" in k,
    }[name]
    assert changed and all(expected(k) for k in changed), sorted(k for k in changed if not expected(k))[:5]
    assert any(k.startswith("student.") for k in changed) == (name != "textual_inversion")
    assert (row in changed) == (name != "dreambooth_lora")
    # No teacher weights in any baseline's bundle, and none on the student for Textual Inversion.
    assert bundle.teacher_adapter == {} and (bundle.student_adapter == {}) == (name == "textual_inversion")


def test_custom_diffusion_baseline_wraps_the_student_kv_and_lora_every_attention_projection(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    StudentBaseline(pair, _images(), _config("custom_diffusion"), "custom_diffusion")
    wrapped = [n for n, m in pair.student.unet.named_modules() if isinstance(m, WeightDelta)]
    assert wrapped and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in wrapped)
    assert not any(isinstance(m, WeightDelta) for m in pair.teacher.unet.modules())

    pair = load_model_pair(*tiny_pair_folders)
    StudentBaseline(pair, _images(), _config("dreambooth_lora"), "dreambooth_lora")
    adapted = {n.split(".lora_")[0] for n, _ in pair.student.unet.named_parameters() if "lora_A" in n}
    for suffix in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v"):
        assert any(n.endswith(suffix) for n in adapted), suffix


def test_a_baselines_token_row_trains_at_its_own_rate_when_one_is_given(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    published = StudentBaseline(pair, _images(), _config("custom_diffusion"), "custom_diffusion")
    assert [group["lr"] for group in published.optimizer.param_groups] == [1e-5]
    pair = load_model_pair(*tiny_pair_folders)
    own = StudentBaseline(pair, _images(), _config("custom_diffusion", lr_token=1e-3), "custom_diffusion")
    adapters, rows = own.optimizer.param_groups
    assert (adapters["lr"], rows["lr"]) == (1e-5, 1e-3)
    assert rows["params"] == [concept_embedding(pair.text_encoder).concept_row]
    # DreamBooth's identifier stays frozen whatever the rate: there is no row to give it to.
    pair = load_model_pair(*tiny_pair_folders)
    frozen = StudentBaseline(pair, _images(), _config("dreambooth_lora", lr_token=1e-3), "dreambooth_lora")
    assert len(frozen.optimizer.param_groups) == 1


def test_dreambooth_identifier_is_the_rare_words_frozen_row(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    [rare_id] = pair.tokenizer(DREAMBOOTH_IDENTIFIER, add_special_tokens=False).input_ids
    rare_row = pair.text_encoder.get_input_embeddings().weight[rare_id].detach().clone()
    bundle = StudentBaseline(pair, _images(), _config("dreambooth_lora"), "dreambooth_lora").train()
    assert bundle.initializer == DREAMBOOTH_IDENTIFIER and torch.equal(bundle.embedding, rare_row)
    assert bundle.config["lora_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_bundle_saves_loads_and_samples_like_the_trained_student(name, tiny_pair_folders, tmp_path):
    pair = load_model_pair(*tiny_pair_folders)
    prompts, options = ["a photo of a <v*> dog"] * 2, dict(seeds=[0, 1], width=64, height=64, return_latents=False)
    with pristine(pair):
        bundle = StudentBaseline(pair, _images(), _config(name, steps=2), name).train()
        trained = sample_student(pair, prompts, **options).images  # the trained pair itself
    # pristine handed the pair back as loaded: no token, no adapters.
    assert "<v*>" not in pair.tokenizer.get_vocab() and not adapter_state_dict(pair.student.unet)

    loaded = ConceptBundle.load(bundle.save(tmp_path / f"{name}.safetensors"))
    images = sample(load_model_pair(*tiny_pair_folders), prompts, concept=loaded, part="student", **options).images
    assert torch.allclose(images, trained, atol=1e-6)


def test_unknown_baseline_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown baseline 'lora'; valid baselines: custom_diffusion, "
                                          "textual_inversion, dreambooth_lora"):
        baseline_config("lora")
    assert baseline_config("textual_inversion").lr_student == 5e-3 and not baseline_config("custom_diffusion").echo
