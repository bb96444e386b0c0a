"""Encoders whose pooled output is the representation that pretraining learns.

The paper's backbone is torchvision's ResNet-18 with ``zero_init_residual=True`` and
random initialisation; ResNet-50 is the usual larger alternative.
"""
from __future__ import annotations

from torch import nn
from torchvision import models

BACKBONES = ("resnet18", "resnet50")


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``: a randomly initialised network mapping
    images (B, 3, H, W) to pooled features (B, feature_dim)."""
    if name not in BACKBONES:
        raise ValueError(f"--backbone {name!r} is not supported; choose one of {', '.join(BACKBONES)}")
    # zero_init_residual starts every residual block as the identity, as in SimSiam/CluSiam.
    network = getattr(models, name)(weights=None, zero_init_residual=True)
    feature_dim = network.fc.in_features
    network.fc = nn.Identity()  # the projector replaces the classifier
    return network, feature_dim
