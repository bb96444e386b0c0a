"""DSMIL (Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning Network for Whole Slide
Image Classification with Self-supervised Contrastive Learning", CVPR 2021), gated attention
MIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018),
and the max-pooling and mean-pooling baselines, all with one interface:

    instance_logits (N, C), bag_logits (C,), attention (N, C) = model(features (N, D))

``dual_stream`` says whether the instance logits are a second output to train and score
(DSMIL), or only explain where a baseline's bag logit comes from.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

QUERY_DIM = 128
ATTENTION_DIM = 128  # ABMIL's hidden size D


def orthogonal_init(module: nn.Module) -> None:
    """Orthogonal weights, zero biases: the authors' 2024 fix for runs stuck with identical
    attention on every patch."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            nn.init.orthogonal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class DSMIL(nn.Module):
    """Instance stream (a linear classifier on every patch) and bag stream (attention of
    every patch to the critical patch of each class, then a Conv1d over the weighted sum)."""

    dual_stream = True

    def __init__(self, feature_dim: int, num_classes: int, value_dropout: float | None = None) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(feature_dim, num_classes)
        self.query = nn.Sequential(nn.Linear(feature_dim, QUERY_DIM), nn.ReLU(),
                                   nn.Linear(QUERY_DIM, QUERY_DIM), nn.Tanh())
        # v is the identity by default; the optional Dropout-Linear-ReLU is the reference's nonlinear value.
        self.value = (nn.Identity() if value_dropout is None else
                      nn.Sequential(nn.Dropout(value_dropout), nn.Linear(feature_dim, feature_dim), nn.ReLU()))
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=feature_dim)
        orthogonal_init(self)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        instance_logits = self.instance_classifier(features)  # (N, C)
        queries = self.query(features)  # (N, 128)
        critical = instance_logits.argmax(0)  # the highest-scoring patch of each class
        critical_queries = self.query(features[critical])  # (C, 128)
        attention = torch.softmax(queries @ critical_queries.T / math.sqrt(QUERY_DIM), dim=0)  # (N, C)
        bag_features = attention.T @ self.value(features)  # (C, D)
        bag_logits = self.bag_classifier(bag_features.unsqueeze(0)).flatten()  # (C,)
        return instance_logits, bag_logits, attention


class MaxPooling(nn.Module):
    """Baseline: a linear classifier on every patch; the bag logit is the maximum."""

    dual_stream = False

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(feature_dim, num_classes)
        orthogonal_init(self)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        instance_logits = self.instance_classifier(features)
        attention = torch.softmax(instance_logits, dim=0)  # where the bag score comes from
        return instance_logits, instance_logits.max(0).values, attention


class MeanPooling(nn.Module):
    """Baseline: a linear classifier on the mean feature of the bag."""

    dual_stream = False

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(feature_dim, num_classes)
        orthogonal_init(self)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        instance_logits = self.classifier(features)  # linear, so their mean is the bag logit
        attention = torch.full_like(instance_logits, 1.0 / len(features))
        return instance_logits, self.classifier(features.mean(0)), attention


class ABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018, eq. 9): one attention weight per patch,

        a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) ),   z = sum_k a_k h_k,

    and a linear classifier on z. The paper's L = 500 was the width of its own embedding;
    here h_k is the frozen patch feature itself, and its D = 128 is the attention's hidden
    size. One attention branch serves all the classes (the paper's single-branch form)."""

    dual_stream = False

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        # No biases in V, U, w, as in eq. 9 (a bias in w would cancel in the softmax anyway).
        self.V = nn.Linear(feature_dim, ATTENTION_DIM, bias=False)
        self.U = nn.Linear(feature_dim, ATTENTION_DIM, bias=False)
        self.w = nn.Linear(ATTENTION_DIM, 1, bias=False)
        self.classifier = nn.Linear(feature_dim, num_classes)
        # As the other aggregators, so that a comparison differs only in how patches are pooled.
        orthogonal_init(self)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gated = torch.tanh(self.V(features)) * torch.sigmoid(self.U(features))  # (N, 128)
        weights = torch.softmax(self.w(gated), dim=0)  # (N, 1), sums to 1 over the patches
        bag_logits = self.classifier(weights.T @ features).flatten()  # (C,)
        # An explanation only: the classifier is linear, so the bag logit is the
        # attention-weighted sum of these.
        instance_logits = self.classifier(features)  # (N, C)
        return instance_logits, bag_logits, weights.repeat(1, bag_logits.numel())  # the one attention, per class


AGGREGATORS = {"dsmil": DSMIL, "abmil": ABMIL, "max": MaxPooling, "mean": MeanPooling}
