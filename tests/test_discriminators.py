"""Discriminator ensemble on tiny random backbones and a tiny UNet, CPU only."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from echodistill.errors import BackboneError
from echodistill.training.discriminators import (
    BACKBONES,
    DiscriminatorEnsemble,
    DiscriminatorHead,
    TeacherFeatureDiscriminator,
    build_ensemble,
    infer_config,
    load_backbone,
    load_ip_adapter_image_projection,
)


def _tiny(name: str, heads: int = 2):
    """A tiny random transformers model of the family registered under `name`."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, num_channels=3)
    if name == "dino_vits16":
        return ViTModel(ViTConfig(**common, intermediate_size=64, image_size=32, patch_size=8)).eval()
    if name == "dinov2_vitl14":
        return Dinov2Model(Dinov2Config(**common, mlp_ratio=2, image_size=28, patch_size=14)).eval()
    config = CLIPVisionConfig(**common, intermediate_size=64, image_size=32, patch_size=8,
                              projection_dim=16, hidden_act="gelu")  # gelu like OpenCLIP ViT-H
    return CLIPVisionModelWithProjection(config).eval()


def _saved_state(model, folder) -> dict[str, torch.Tensor]:
    """The state dict as transformers writes it to disk (its in-memory names differ in v5)."""
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _reference(name: str, model, images: torch.Tensor) -> torch.Tensor:
    """What the backbone should return: the transformers model on resized, normalized pixels."""
    spec = BACKBONES[name]
    size = min(spec.image_size, model.config.image_size)
    x = F.interpolate((images + 1) / 2, size=(size, size), mode="bilinear", antialias=True)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.image_embeds if name == "clip_vit_h14" else out.last_hidden_state[:, 0]


def _images(seed: int = 1, size: int = 40) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_folder_backbone_matches_transformers(name, tmp_path):
    model = _tiny(name)
    model.save_pretrained(tmp_path / name)
    backbone = load_backbone(name, tmp_path / name)
    images = _images()
    features = backbone(images)
    assert features.shape == (2, backbone.feature_dim)
    assert backbone.feature_dim == (16 if name == "clip_vit_h14" else 32)
    torch.testing.assert_close(features, _reference(name, model, images))


@pytest.mark.parametrize("name, prefix, extra", [
    ("dino_vits16", "", {}),
    ("dino_vits16", "vit.", {"classifier.weight": torch.zeros(10, 32)}),
    ("dinov2_vitl14", "", {}),
    ("clip_vit_h14", "", {}),  # ComfyUI's clip_vision layout, no config anywhere
    ("clip_vit_h14", "", {"text_model.embeddings.token_embedding.weight": torch.zeros(8, 32),
                          "logit_scale": torch.zeros(())}),  # a full CLIP model's file
])
def test_single_file_backbone_matches_transformers(name, prefix, extra, tmp_path):
    model = _tiny(name, heads=1)  # width 32 is not a known size: the loader guesses one head
    state = {prefix + k: v for k, v in _saved_state(model, tmp_path / "folder").items()}
    file = tmp_path / "weights.safetensors"
    save_file({**state, **extra}, file)
    with pytest.warns(UserWarning, match="guessing 1 attention head"):
        backbone = load_backbone(name, file)
    images = _images(size=24)
    torch.testing.assert_close(backbone(images), _reference(name, model, images))


@pytest.mark.parametrize("name, shapes, expected", [
    ("clip_vit_h14", {
        "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (257, 1280),
        **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (5120, 1280) for i in range(32)},
        "visual_projection.weight": (1024, 1280),
    }, dict(num_attention_heads=16, num_hidden_layers=32, patch_size=14, image_size=224,
            projection_dim=1024, intermediate_size=5120, hidden_act="gelu")),
    ("dino_vits16", {
        "embeddings.patch_embeddings.projection.weight": (384, 3, 16, 16),
        "embeddings.position_embeddings": (1, 197, 384),
        **{f"encoder.layer.{i}.intermediate.dense.weight": (1536, 384) for i in range(12)},
        "encoder.layer.0.attention.attention.query.bias": (384,),
    }, dict(num_attention_heads=6, num_hidden_layers=12, patch_size=16, image_size=224)),
    ("dinov2_vitl14", {
        "embeddings.patch_embeddings.projection.weight": (1024, 3, 14, 14),
        "embeddings.position_embeddings": (1, 1370, 1024),
        **{f"encoder.layer.{i}.mlp.fc1.weight": (4096, 1024) for i in range(24)},
    }, dict(num_attention_heads=16, num_hidden_layers=24, patch_size=14, image_size=518, mlp_ratio=4)),
])
def test_infer_config_of_released_models(name, shapes, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # standard sizes need no guess
        config = infer_config(name, shapes)
    assert {k: getattr(config, k) for k in expected} == expected


def test_backbone_is_frozen_but_differentiable_in_its_input(tmp_path):
    _tiny("clip_vit_h14").save_pretrained(tmp_path / "clip")
    backbone = load_backbone("clip_vit_h14", tmp_path / "clip")
    backbone.train()
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.parameters())
    images = _images().requires_grad_(True)
    backbone(images).square().sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_backbone_errors_are_actionable(tmp_path):
    with pytest.raises(BackboneError, match=r"unknown backbone 'dino'.*clip_vit_h14, dino_vits16"):
        load_backbone("dino", tmp_path)
    with pytest.raises(BackboneError, match=r"CLIP-ViT-H-14-laion2B-s32B-b79K\.safetensors"):
        load_backbone("clip_vit_h14", tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="has no config.json"):
        load_backbone("dino_vits16", tmp_path / "empty")
    _tiny("dinov2_vitl14").save_pretrained(tmp_path / "v2")
    with pytest.raises(BackboneError, match="holds a 'dinov2' model, not DINO ViT-S/16"):
        load_backbone("dino_vits16", tmp_path / "v2")
    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 3)},
              tmp_path / "openclip.safetensors")
    with pytest.raises(BackboneError, match="OpenCLIP/timm layout"):
        load_backbone("clip_vit_h14", tmp_path / "openclip.safetensors")
    clip = {k: v for k, v in _saved_state(_tiny("clip_vit_h14", heads=1), tmp_path / "c").items()
            if not k.startswith("visual_projection")}
    save_file(clip, tmp_path / "noproj.safetensors")
    with pytest.raises(BackboneError, match="no visual_projection.weight"):
        load_backbone("clip_vit_h14", tmp_path / "noproj.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "noproj.safetensors").read_bytes()[:300])
    with pytest.raises(BackboneError, match=r"cut.safetensors is not a readable safetensors file \(.*\): give the "
                                            r"CLIP ViT-H/14 .*weights"):
        load_backbone("clip_vit_h14", tmp_path / "cut.safetensors")
    dinov2 = _saved_state(_tiny("dinov2_vitl14", heads=1), tmp_path / "d")
    for drop, message in [("encoder.layer.0.mlp.fc1.weight", "lacks the tensor 'encoder.layer.0.mlp.fc1"),
                          ("encoder.layer.1.mlp.fc2.weight", "lacks or mis-sizes 1 weights of DINOv2")]:
        save_file({k: v for k, v in dinov2.items() if k != drop}, tmp_path / "cut.safetensors")
        with warnings.catch_warnings(), pytest.raises(BackboneError, match=message):
            warnings.simplefilter("ignore")  # the head-count guess for width 32
            load_backbone("dinov2_vitl14", tmp_path / "cut.safetensors")


def test_head_maps_features_to_two_logits():
    head = DiscriminatorHead(24, hidden_dim=16)
    assert head(torch.randn(5, 24)).shape == (5, 2)
    assert [m.__class__.__name__ for m in head.net] == ["Linear", "ReLU", "Linear"]
    assert head.net[0].out_features == 16 and DiscriminatorHead(8).net[0].out_features == 512


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():  # simulate the teacher's trained K/V
        if "attn2.to_k" in name or "attn2.to_v" in name:
            p.requires_grad_(True)
    return unet


def _unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 700])[:batch]
    encoder_hidden_states = torch.randn(batch, 7, 32, generator=g)
    return latents, timesteps, encoder_hidden_states


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_features_give_gradients_to_heads_and_latents_only(checkpointing):
    unet = _tiny_unet()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    disc = TeacherFeatureDiscriminator(unet, hidden_dim=16)
    latents, timesteps, ehs = _unet_inputs()
    latents.requires_grad_(True)
    logits = disc(latents, timesteps, ehs)
    assert logits.shape == (2, 5, 2)  # 4 down blocks + mid
    logits.square().sum().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None for p in disc.head_parameters())
    assert latents.grad.abs().sum() > 0
    assert unet.is_gradient_checkpointing is checkpointing  # restored after the forward
    # The UNet is held by reference: not a parameter, not in the saved state.
    unet_params = {id(p) for p in unet.parameters()}
    assert not any(id(p) in unet_params for p in disc.parameters())
    assert all(k.startswith("heads.") for k in disc.state_dict())


def test_teacher_features_are_the_unets_own_encoder_outputs():
    unet = _tiny_unet()
    disc = TeacherFeatureDiscriminator(unet, hidden_dim=16)
    latents, timesteps, ehs = _unet_inputs()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for m in [*unet.down_blocks, unet.mid_block]]
    with torch.no_grad():
        unet(latents, timesteps, encoder_hidden_states=ehs)
        pooled = disc.features(latents, timesteps, ehs)
    for h in hooks:
        h.remove()
    assert [p.shape[1] for p in pooled] == [32, 32, 64, 64, 64]
    for ours, theirs in zip(pooled, seen):
        torch.testing.assert_close(ours, theirs.mean(dim=(-2, -1)))


def _ip_adapter_tensors(clip_dim: int = 16, cross_dim: int = 32, tokens: int = 4):
    g = torch.Generator().manual_seed(5)
    return {
        "proj.weight": torch.randn(tokens * cross_dim, clip_dim, generator=g),
        "proj.bias": torch.randn(tokens * cross_dim, generator=g),
        "norm.weight": torch.rand(cross_dim, generator=g) + 0.5,
        "norm.bias": torch.randn(cross_dim, generator=g),
    }


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_ip_adapter_projection_loads_and_projects(layout, tmp_path):
    tensors = _ip_adapter_tensors()
    ip_layer = {"1.to_k_ip.weight": torch.zeros(32, 16)}
    if layout == "safetensors":
        file = tmp_path / "ip.safetensors"
        save_file({**{f"image_proj.{k}": v for k, v in tensors.items()},
                   **{f"ip_adapter.{k}": v for k, v in ip_layer.items()}}, file)
    else:
        file = tmp_path / "ip.bin"
        torch.save({"image_proj": tensors, "ip_adapter": ip_layer}, file)
    projection = load_ip_adapter_image_projection(file)
    embeds = torch.randn(3, 16, requires_grad=True)
    tokens = projection(embeds)
    assert tokens.shape == (3, 4, 32)
    expected = F.layer_norm((embeds @ tensors["proj.weight"].T + tensors["proj.bias"]).view(3, 4, 32),
                            (32,), tensors["norm.weight"], tensors["norm.bias"])
    torch.testing.assert_close(tokens, expected)
    tokens.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in projection.parameters())


def test_ip_adapter_errors(tmp_path):
    with pytest.raises(BackboneError, match="IP-Adapter file not found.*models/ipadapter"):
        load_ip_adapter_image_projection(tmp_path / "nope.safetensors")
    save_file({"image_proj.latents": torch.zeros(1, 16, 32)}, tmp_path / "plus.safetensors")
    with pytest.raises(BackboneError, match="Plus/FaceID Resampler"):
        load_ip_adapter_image_projection(tmp_path / "plus.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "plus.safetensors").read_bytes()[:60])
    with pytest.raises(BackboneError, match=r"cut.safetensors is not a readable safetensors file \(.*\): use an "
                                            r"IP-Adapter file"):
        load_ip_adapter_image_projection(tmp_path / "cut.safetensors")
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04junk" * 40)
    with pytest.raises(BackboneError, match=r"junk.bin is not a readable PyTorch file .*; use an IP-Adapter file"):
        load_ip_adapter_image_projection(tmp_path / "junk.bin")


def test_ensemble_builds_runs_and_exposes_only_heads(tmp_path):
    _tiny("dino_vits16").save_pretrained(tmp_path / "dino")
    clip_file = tmp_path / "clip.safetensors"
    save_file(_saved_state(_tiny("clip_vit_h14", heads=1), tmp_path / "c"), clip_file)
    save_file({f"image_proj.{k}": v for k, v in _ip_adapter_tensors().items()}, tmp_path / "ip.safetensors")
    unet = _tiny_unet()
    with pytest.warns(UserWarning):
        ensemble = build_ensemble(
            [("dino_vits16", tmp_path / "dino"), ("clip_vit_h14", clip_file), ("teacher_features", None)],
            teacher_unet=unet, ip_adapter_path=tmp_path / "ip.safetensors", hidden_dim=16)
    assert isinstance(ensemble, DiscriminatorEnsemble)
    assert ensemble.needs_images and ensemble.needs_latents
    assert ensemble.members["clip_vit_h14"].head.feature_dim == 4 * 32  # IP-Adapter tokens, flattened
    heads = ensemble.heads_parameters()
    assert {id(p) for p in heads} == {id(p) for p in ensemble.parameters() if p.requires_grad}
    assert len(heads) == 4 * (1 + 1 + 5)  # weight + bias of two Linears per head

    images = _images().requires_grad_(True)
    latents, timesteps, ehs = _unet_inputs()
    logits = ensemble(images=images, latents=latents, timesteps=timesteps, encoder_hidden_states=ehs)
    assert set(logits) == {"dino_vits16", "clip_vit_h14", "teacher_features"}
    assert all(v.shape == (2, 2) for v in logits.values())
    sum(v.sum() for v in logits.values()).backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads)
    assert all(p.grad is None for p in unet.parameters())

    saved = ensemble.heads_state_dict()
    assert not any("backbone" in k for k in saved)
    with torch.no_grad():
        for p in heads:
            p.zero_()
    ensemble.load_heads_state_dict(saved)
    assert all(torch.equal(ensemble.heads_state_dict()[k], v) for k, v in saved.items())

    with pytest.raises(BackboneError, match="judges noised latents; pass latents="):
        ensemble(images=images)


def test_ensemble_build_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown discriminator 'dino'.*teacher_features"):
        build_ensemble([("dino", tmp_path)])
    with pytest.raises(BackboneError, match="needs the teacher UNet"):
        build_ensemble([("teacher_features", None)])
    with pytest.raises(BackboneError, match="needs a weights path"):
        build_ensemble([("dinov2_vitl14", None)])
    with pytest.raises(BackboneError, match="listed twice"):
        unet = _tiny_unet()
        build_ensemble([("teacher_features", None)] * 2, teacher_unet=unet)
