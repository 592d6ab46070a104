"""Model identity: a bundle knows the weights its adapters modify, and refuses a base model where they differ."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from echodistill.concepts.bundle import BundleMismatchError, ConceptBundle, initializer_fingerprint
from echodistill.models import tiny
from echodistill.models.adapters import adapter_state_dict, add_custom_diffusion
from echodistill.models.loading import ModelSource, load_unet
from echodistill.models.pair import load_model_pair, unet_fingerprint_keys
from echodistill.models.tensor_files import TensorFile


def _bundle(pair, fingerprints=None) -> ConceptBundle:
    generator = torch.Generator().manual_seed(0)
    states = {}
    for part in ("student", "teacher"):
        unet = getattr(pair, part).unet
        add_custom_diffusion(unet)
        states[part] = {k: torch.randn(v.shape, generator=generator) * 0.05
                        for k, v in adapter_state_dict(unet).items()}
    bundle = ConceptBundle(token="<v*>", initializer="dog", class_word="dog",
                           embedding=torch.randn(pair.text_encoder.config.hidden_size, generator=generator),
                           adapter="custom_diffusion", student_adapter=states["student"],
                           teacher_adapter=states["teacher"], fingerprints=fingerprints or pair.fingerprints(),
                           families={"teacher": "teacher", "student": "student"}, step=3)
    return bundle


def _edit(folder, component, file, key, edit):
    path = folder / component / file
    state = load_file(str(path))
    state[key] = edit(state[key].clone())
    save_file(state, str(path))


@pytest.fixture(scope="module")
def merged_student(tiny_pair_folders, tmp_path_factory):
    """The tiny student with a LoRA merged into one cross-attention K: only K/V differ from the base."""
    folder = tmp_path_factory.mktemp("merged") / "student"
    shutil.copytree(tiny_pair_folders[1], folder)
    keys = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).keys()
    to_k = sorted(k for k in keys if k.endswith("attn2.to_k.weight"))[0]

    def merge(weight):  # W + up @ down, rank 1
        return weight + 0.1 * torch.ones(weight.shape[0], 1) @ torch.ones(1, weight.shape[1])

    _edit(folder, "unet", "diffusion_pytorch_model.safetensors", to_k, merge)
    return folder


def test_a_bundle_is_refused_on_a_student_whose_cross_attention_differs(tiny_pair_folders, merged_student):
    base = load_model_pair(*tiny_pair_folders)
    bundle = _bundle(load_model_pair(*tiny_pair_folders))
    merged = load_model_pair(tiny_pair_folders[0], merged_student)
    # Only the K/V differ: the UNet's ends (all older versions hashed) are the same.
    assert merged.legacy_fingerprints() == base.legacy_fingerprints()
    with pytest.raises(BundleMismatchError, match=r"trained on a student unet with fingerprint [0-9a-f]{12}, but the "
                                                  r"loaded one is [0-9a-f]{12} \(its cross-attention K/V or other "
                                                  r"weights differ: another checkpoint, or a LoRA merged into it\)"):
        bundle.apply(merged, parts=("student",))
    bundle.apply(base, parts=("student",))  # the base it was trained on


def test_a_bundle_is_refused_when_the_initializer_rows_differ(tiny_pair_folders, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair_folders[0], teacher)
    pair = load_model_pair(*tiny_pair_folders)
    dog = pair.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert dog > 1024  # beyond the rows the text encoder's own fingerprint reads
    trained = _bundle(pair, {**pair.fingerprints(), "initializer_rows": initializer_fingerprint(pair, "dog")})
    file = next(p.name for p in (teacher / "text_encoder").glob("*.safetensors"))
    key = next(k for k in load_file(str(teacher / "text_encoder" / file)) if k.endswith("token_embedding.weight"))
    _edit(teacher, "text_encoder", file, key, lambda w: w.index_fill_(0, torch.tensor([dog]), 0.5))
    other = load_model_pair(teacher, tiny_pair_folders[1])
    assert other.fingerprints() == load_model_pair(*tiny_pair_folders).fingerprints()
    with pytest.raises(BundleMismatchError, match="rows for the initializer 'dog' differ"):
        trained.apply(other, parts=("student",))


def test_fingerprints_read_only_the_tensors_they_hash(tiny_world, tmp_path, monkeypatch):
    world = tiny_world
    path = tiny.write_single_file(world["models"]["student"], tmp_path / "student.safetensors",
                                  world["families"]["tiny-turbo"], "sgm", "openclip")
    source = ModelSource.open(path, world["families"]["tiny-turbo"], role="student")
    unet = load_unet(source, torch.float32, "cpu")
    names = unet_fingerprint_keys(unet)
    assert sum(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in names) == 2 * sum(
        1 for m, _ in unet.named_modules() if m.endswith("attn2"))
    read = []
    real_get = TensorFile.get
    monkeypatch.setattr(TensorFile, "get", lambda self, key: read.append(key) or real_get(self, key))
    source.fingerprint("unet", names)
    assert len(read) == len(names) < len(source.weights.keys()) // 4


def test_bundles_from_older_versions_still_apply_to_their_base(tiny_pair_folders):
    pair = load_model_pair(*tiny_pair_folders)
    old = _bundle(load_model_pair(*tiny_pair_folders), fingerprints=dict(pair.legacy_fingerprints()))
    assert "scheme" not in old.fingerprints
    old.apply(pair, parts=("student",))
    swapped = load_model_pair(tiny_pair_folders[1], tiny_pair_folders[0])
    with pytest.raises(BundleMismatchError, match="trained on a student unet"):
        _bundle(load_model_pair(*tiny_pair_folders), fingerprints=dict(pair.legacy_fingerprints())).apply(
            swapped, parts=("student",))
