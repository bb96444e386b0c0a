"""Encoders whose pooled output is the representation that pretraining learns.

- ``resnet18`` (the paper's) and ``resnet50``: torchvision, ``zero_init_residual=True``,
  random initialisation;
- ``mit_b1``: SegFormer's MiT-B1 (clusiam.mit), the encoder of the LPD segmenter;
- any other name: a timm model (``timm.create_model(name, num_classes=0)``), e.g.
  ``vit_small_patch16_224`` for ViT-based segmentation frameworks.
"""
from __future__ import annotations

from torch import nn
from torchvision import models

from clusiam.mit import MixVisionTransformer

TORCHVISION_BACKBONES = ("resnet18", "resnet50")
BACKBONES = (*TORCHVISION_BACKBONES, "mit_b1", "<any timm model name>")


def backbone_family(name: str) -> str:
    """torchvision, mit or timm; an unknown name is an error that says what is known."""
    if name in TORCHVISION_BACKBONES:
        return "torchvision"
    if name == "mit_b1":
        return "mit"
    import timm

    if timm.is_model(name):
        return "timm"
    raise ValueError(f"--backbone {name!r} is unknown: use {', '.join(TORCHVISION_BACKBONES)}, mit_b1, "
                     "or a timm model name (python -c 'import timm; print(timm.list_models())')")


def build_timm(name: str) -> nn.Module:
    """A timm model without classifier; ViTs accept any input size (the position
    embedding is interpolated), which leaves their weights in the standard layout."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # models without dynamic_img_size
        return timm.create_model(name, pretrained=False, num_classes=0)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``: a randomly initialised network mapping
    images (B, 3, H, W) to pooled features (B, feature_dim)."""
    family = backbone_family(name)
    if family == "torchvision":
        # zero_init_residual starts every residual block as the identity, as in SimSiam/CluSiam.
        network = getattr(models, name)(weights=None, zero_init_residual=True)
        feature_dim = network.fc.in_features
        network.fc = nn.Identity()  # the projector replaces the classifier
        return network, feature_dim
    network = MixVisionTransformer() if family == "mit" else build_timm(name)
    return network, network.num_features
