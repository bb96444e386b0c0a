"""One optimisation step of pretraining: the optimizer and its learning-rate schedule, the
loss of a forward pass, and the step itself. Shared by the training loop, the benchmarks
and the multi-process tests, so that they all measure and check the same step.

The step never reads a value back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clusiam.distributed import gather_views
from clusiam.losses import byol_invariance, cluster_similarity, simsiam_invariance
from clusiam.models import Method, PretrainModel, PretrainOutput


@dataclass(frozen=True)
class LossSettings:
    """The loss's settings: L = (1 - alpha) L_inv + alpha L_clu, Gumbel temperature ``tau``
    and the normalisation epsilon ``eps`` (``--alpha``, ``--tau``, ``--eps``)."""

    alpha: float
    tau: float = 1.0
    eps: float = 1e-8


def build_optimizer(model: PretrainModel, init_lr: float, momentum: float, weight_decay: float,
                    fix_pred_lr: bool) -> torch.optim.SGD:
    """SGD over the trainable parameters. Under ``fix_pred_lr`` the predictor gets its own
    group flagged ``fix_lr``, which :func:`set_learning_rate` holds at ``init_lr``."""
    predictor = {id(p) for p in model.predictor.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if fix_pred_lr:
        groups = [
            {"params": [p for p in trainable if id(p) not in predictor], "fix_lr": False},
            {"params": [p for p in trainable if id(p) in predictor], "fix_lr": True},
        ]
    else:
        groups = [{"params": trainable, "fix_lr": False}]
    return torch.optim.SGD(groups, lr=init_lr, momentum=momentum, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, init_lr: float, epoch: int, epochs: int) -> float:
    """The authors' per-epoch cosine: init_lr * (1 + cos(pi * epoch / epochs)) / 2.
    (lightly's schedule reaches its end value at max_steps - 1, hence epochs + 1.)"""
    lr = cosine_schedule(epoch, epochs + 1, init_lr, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group["fix_lr"] else lr
    return lr


def compute_losses(method: Method, output: PretrainOutput, settings: LossSettings,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Invariance loss, cluster loss (clustered methods) and their weighted sum, in fp32.

    The invariance loss is this process's batch mean (DDP averages its gradients over the
    processes). The cluster loss is computed on the global batch, gathered from every
    process, with Gumbel noise from ``generator`` (seeded alike on every process)."""
    p1, p2 = (p.float() for p in output.predictions)
    t1, t2 = (t.float() for t in output.targets)
    invariance_fn = byol_invariance if method.momentum_target else simsiam_invariance
    losses = {"invariance": invariance_fn(p1, p2, t1, t2, settings.eps)}
    if output.cluster_logits is None:
        losses["loss"] = losses["invariance"]
        return losses
    losses["cluster"] = cluster_similarity(
        gather_views([z.float() for z in output.projections]), gather_views([a.float() for a in output.cluster_logits]),
        settings.tau, settings.eps, generator,
    )
    losses["loss"] = (1 - settings.alpha) * losses["invariance"] + settings.alpha * losses["cluster"]
    return losses


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
                  loss: LossSettings, autocast: bool, target_momentum: float | None = None,
                  generator: torch.Generator | None = None) -> tuple[PretrainOutput, dict[str, torch.Tensor]]:
    """One optimisation step on a pair of views; nothing is read back to the host.
    ``network`` is a :class:`PretrainModel` or its DistributedDataParallel wrapper."""
    model = network.module if isinstance(network, DistributedDataParallel) else network
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=autocast):
        output = network(x1, x2)
    losses = compute_losses(model.method, output, loss, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    if target_momentum is not None:
        model.update_target(target_momentum)
    return output, losses
