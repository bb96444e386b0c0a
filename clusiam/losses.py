"""Loss functions as small pure functions of tensors.

Notation follows Wu et al., ICCV 2023, and the authors' code: p = predictor output,
t = target (sg(z) for SimSiam, the momentum network's projection for BYOL), a = cluster
assigner logits, alpha = weight of the cluster term. None of these functions reads a value
back to the host, so the training step stays free of synchronisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss.negative_cosine_similarity import NegativeCosineSimilarity
from torch import Tensor


def simsiam_invariance(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, eps: float = 1e-8) -> Tensor:
    """SimSiam's symmetric loss -(cos(p1, t2) + cos(p2, t1)), each averaged over the batch.
    Range [-2, 2]."""
    negative_cosine = NegativeCosineSimilarity(eps=eps)
    return negative_cosine(p1, t2.detach()) + negative_cosine(p2, t1.detach())


def byol_invariance(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor, eps: float = 1e-8) -> Tensor:
    """BYOL's (1 - cos(p1, t2)) + (1 - cos(p2, t1)). Range [0, 4]; the SimSiam loss plus 2,
    so the gradients are the same and only the reported value differs."""
    return 2.0 + simsiam_invariance(p1, p2, t1, t2, eps)


def gumbel_softmax(logits: Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Soft Gumbel-softmax samples of ``logits``: ``F.gumbel_softmax``'s sampling written out,
    because it takes no generator. With the global RNG it draws exactly what that draws."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=1)


def cluster_similarity(representations: Tensor, logits: Tensor, tau: float = 1.0, eps: float = 1e-8,
                       generator: torch.Generator | None = None) -> Tensor:
    """CluSiam's cluster loss: the mean cosine similarity between the centres of the
    clusters used in the batch (lower = centres pushed further apart).

    Args:
        representations: (N, D) rows R the centres are averaged from; pass them detached
            (sg(z)), as the paper does.
        logits: (N, K) cluster assigner logits A; gradients flow through the assignment.
        tau: Gumbel-softmax temperature.
        eps: normalisation epsilon.
        generator: where the Gumbel noise comes from. The default, torch's global RNG,
            draws exactly what ``F.gumbel_softmax`` draws; a generator seeded alike on
            every rank gives every rank the same noise for the gathered batch.

    Returns 1 when fewer than two clusters are used.
    """
    rows = F.normalize(representations, dim=1, eps=eps)
    soft = gumbel_softmax(logits, tau, generator)  # with the same seed, the authors' noise exactly
    one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    hard = one_hot - soft.detach() + soft  # straight-through: hard forward, soft gradient
    counts = hard.sum(dim=0)
    centres = (hard.T @ rows.to(hard.dtype)) / torch.maximum(counts, torch.ones_like(counts)).unsqueeze(1)
    centres = F.normalize(centres, dim=1, eps=eps)
    similarity = centres @ centres.T

    used = one_hot.sum(dim=0) > 0
    pairs = torch.triu(used.unsqueeze(0) & used.unsqueeze(1), diagonal=1)
    num_pairs = pairs.sum()
    mean_similarity = (similarity * pairs).sum() / num_pairs.clamp(min=1)
    return torch.where(num_pairs > 0, mean_similarity, torch.ones_like(mean_similarity))
