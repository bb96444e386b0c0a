"""Signals of the two cluster collapse modes the CluSiam authors report, and of
SimSiam-style representation collapse.

1. Dominant dimension: one logit dominates, so even with Gumbel noise nearly every sample
   lands in one cluster (seen when the cluster loss outweighs the invariance loss).
2. Uniform dimensions: logits nearly equal, so Gumbel noise decides the assignment at
   random (seen with a small alpha).
The authors watched the number of distinct argmax clusters in a batch and the number of
distinct clusters after Gumbel sampling; SimSiam watched the std of the l2-normalised
projections, which falls to 0 on collapse and sits near 1/sqrt(d) when healthy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clusiam.losses import gumbel_softmax

DOMINANT_SHARE = 0.9  # one cluster holding more than this share of a batch: mode 1
UNIFORM_FACTOR = 1.5  # mean max-probability below this many times 1/K: mode 2
COLLAPSED_STD = 0.1  # normalised-projection std below this fraction of 1/sqrt(d)
CLUSTER_DIAGNOSTICS = ("clusters_argmax", "clusters_gumbel", "largest_cluster_share", "mean_max_probability")


@torch.no_grad()
def cluster_diagnostics(logits: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Statistics of the assignment of one batch's logits (N, K), as 0-d tensors. Training
    passes a ``generator`` of its own, so that how often it logs never changes the random
    draws of training."""
    logits = logits.float()
    num_clusters = logits.shape[1]
    argmax_counts = torch.bincount(logits.argmax(1), minlength=num_clusters)
    gumbel_counts = torch.bincount(gumbel_softmax(logits, generator=generator).argmax(1), minlength=num_clusters)
    return {
        "clusters_argmax": (argmax_counts > 0).sum().float(),
        "clusters_gumbel": (gumbel_counts > 0).sum().float(),
        "largest_cluster_share": argmax_counts.max().float() / logits.shape[0],
        "mean_max_probability": logits.softmax(1).max(1).values.mean(),
    }


@torch.no_grad()
def projection_std(projections: Tensor) -> Tensor:
    """Mean over dimensions of the batch std of l2-normalised projections, times sqrt(d),
    so 1 is healthy and 0 is collapsed whatever the projection size."""
    normalised = F.normalize(projections.float(), dim=1)
    return normalised.std(0).mean() * math.sqrt(projections.shape[1])


def collapse_warnings(averages: dict[str, float], num_clusters: int | None) -> list[str]:
    """Plain-language warnings (with advice) for epoch-averaged diagnostics."""
    warnings = []
    if num_clusters is not None and "largest_cluster_share" in averages:
        share = averages["largest_cluster_share"]
        if share > DOMINANT_SHARE:
            warnings.append(
                f"one cluster takes {share:.0%} of each batch (collapse mode 1, dominant dimension): "
                "the cluster loss overwhelms the invariance loss; lower --alpha or --lr"
            )
        max_probability = averages["mean_max_probability"]
        if max_probability < UNIFORM_FACTOR / num_clusters:
            warnings.append(
                f"cluster assignments are nearly uniform (mean max probability {max_probability:.4f} "
                f"for {num_clusters} clusters; collapse mode 2): Gumbel noise decides the clusters; "
                "raise --alpha, or lower --lr if the loss is unstable"
            )
    if averages.get("projection_std", 1.0) < COLLAPSED_STD:
        warnings.append(
            f"normalised projections have std {averages['projection_std']:.3f} x 1/sqrt(d): the representation "
            "is collapsing to a constant; lower --lr or check the augmentations"
        )
    return warnings
