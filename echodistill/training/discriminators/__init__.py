"""Discriminator ensemble: frozen feature extractors with small trainable real/fake heads."""

from echodistill.models.backbones import (
    BACKBONES,
    BackboneSpec,
    FrozenBackbone,
    get_backbone_spec,
    infer_config,
    load_backbone,
)

from .ensemble import (
    MEMBER_KINDS,
    TEACHER_FEATURES,
    BackboneDiscriminator,
    DiscriminatorEnsemble,
    MemberKind,
    build_ensemble,
)
from .heads import DiscriminatorHead
from .ip_adapter import IPAdapterImageProjection, load_ip_adapter_image_projection
from .teacher_features import TeacherFeatureDiscriminator

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FrozenBackbone",
    "IPAdapterImageProjection",
    "get_backbone_spec",
    "infer_config",
    "load_backbone",
    "load_ip_adapter_image_projection",
    "MEMBER_KINDS",
    "TEACHER_FEATURES",
    "BackboneDiscriminator",
    "DiscriminatorEnsemble",
    "MemberKind",
    "build_ensemble",
    "DiscriminatorHead",
    "TeacherFeatureDiscriminator",
]
