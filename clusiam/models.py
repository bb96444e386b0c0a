"""The four pretraining networks: CluSiam, CluBYOL and their baselines SimSiam and BYOL.

- SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
- BYOL: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.
- CluSiam / CluBYOL: Wu et al., "Improving Representation Learning for Histopathologic
  Images with Cluster Constraints", ICCV 2023: SimSiam / BYOL plus a cluster projector and
  a cluster assigner whose Gumbel-softmax assignments feed the cluster loss.

All four share one online network (backbone -> 3-layer projector -> predictor); the BYOL
family adds a momentum target network, the "Clu" family adds the cluster head.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from lightly.models.modules.heads import (
    BYOLPredictionHead,
    ProjectionHead,
    SimSiamPredictionHead,
    SimSiamProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

from clusiam.backbones import build_backbone


@dataclass(frozen=True)
class Method:
    """What distinguishes the four methods, with the paper's defaults."""

    momentum_target: bool  # BYOL family: targets come from an EMA copy of the online network
    clustered: bool  # CluSiam / CluBYOL: cluster projector + assigner and the cluster loss
    feat_size: int  # projector output dimension
    alpha: float  # weight of the cluster loss: L = (1 - alpha) L_inv + alpha L_clu
    fix_pred_lr: bool  # the predictor keeps the initial learning rate (SimSiam's recipe; BYOL decays it)


METHODS = {
    "clusiam": Method(momentum_target=False, clustered=True, feat_size=2048, alpha=0.5, fix_pred_lr=True),
    "clubyol": Method(momentum_target=True, clustered=True, feat_size=256, alpha=0.9, fix_pred_lr=False),
    "simsiam": Method(momentum_target=False, clustered=False, feat_size=2048, alpha=0.0, fix_pred_lr=True),
    "byol": Method(momentum_target=True, clustered=False, feat_size=256, alpha=0.0, fix_pred_lr=False),
}

SIMSIAM_PREDICTOR_HIDDEN = 512
BYOL_PREDICTOR_HIDDEN = 4096


class PretrainOutput(NamedTuple):
    """One forward pass over the two views of a batch."""

    predictions: tuple[Tensor, Tensor]  # p1, p2: trainable
    targets: tuple[Tensor, Tensor]  # what p1, p2 are pulled towards; never carry gradient
    projections: tuple[Tensor, Tensor]  # sg(z1), sg(z2): the rows cluster centres are built from
    cluster_logits: tuple[Tensor, Tensor] | None  # a1, a2, or None without a cluster head


class PretrainModel(nn.Module):
    """Online network (+ target network, + cluster head) for one of :data:`METHODS`."""

    def __init__(
        self,
        model_type: str = "clusiam",
        backbone: str = "resnet18",
        feat_size: int | None = None,
        num_clusters: int = 100,
    ) -> None:
        super().__init__()
        if model_type not in METHODS:
            raise ValueError(f"--model_type {model_type!r} is unknown; choose one of {', '.join(METHODS)}")
        self.model_type = model_type
        self.method = METHODS[model_type]
        feat_size = feat_size or self.method.feat_size

        self.backbone, feature_dim = build_backbone(backbone)
        # Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False), hidden = backbone width.
        self.projector = SimSiamProjectionHead(feature_dim, feature_dim, feat_size)

        if self.method.momentum_target:
            self.predictor = BYOLPredictionHead(feat_size, BYOL_PREDICTOR_HIDDEN, feat_size)
            cluster_hidden = feat_size
            self.target_backbone = copy.deepcopy(self.backbone)
            self.target_projector = copy.deepcopy(self.projector)
            deactivate_requires_grad(self.target_backbone)
            deactivate_requires_grad(self.target_projector)
        else:
            self.predictor = SimSiamPredictionHead(feat_size, SIMSIAM_PREDICTOR_HIDDEN, feat_size)
            cluster_hidden = SIMSIAM_PREDICTOR_HIDDEN

        if self.method.clustered:
            if num_clusters < 2:
                raise ValueError(f"--num_clusters must be at least 2 (got {num_clusters})")
            self.cluster_projector = ProjectionHead(
                [(feat_size, cluster_hidden, nn.BatchNorm1d(cluster_hidden), nn.ReLU())]
            )
            self.cluster_assigner = nn.Linear(cluster_hidden, num_clusters)

    def project(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def project_target(self, x: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(x))

    def assign(self, z: Tensor) -> Tensor:
        return self.cluster_assigner(self.cluster_projector(z))

    def forward(self, x1: Tensor, x2: Tensor) -> PretrainOutput:
        # Each view goes through separately, so BatchNorm sees per-view statistics.
        z1, z2 = self.project(x1), self.project(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.method.momentum_target:
            t1, t2 = self.project_target(x1), self.project_target(x2)
        else:
            t1, t2 = z1.detach(), z2.detach()  # SimSiam's stop-gradient
        logits = None
        if self.method.clustered:
            # z is NOT detached here: the cluster loss trains assigner, cluster projector,
            # projector and backbone. Only the centres' rows (projections) are detached.
            logits = (self.assign(z1), self.assign(z2))
        return PretrainOutput((p1, p2), (t1, t2), (z1.detach(), z2.detach()), logits)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """t = m * t + (1 - m) * online, after every optimizer step (BYOL family)."""
        update_momentum(self.backbone, self.target_backbone, momentum)
        update_momentum(self.projector, self.target_projector, momentum)
