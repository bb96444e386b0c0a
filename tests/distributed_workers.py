"""Work done inside the gloo processes of tests/test_distributed.py. Kept apart from the
tests so each spawned process imports only what it runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clusiam.config import parse_config
from clusiam.distributed import (
    check_replicas_agree,
    earliest_step,
    gather_views,
    main_computes,
    rank,
    shard,
    sum_over_ranks,
)
from clusiam.errors import ConfigError
from clusiam.features import PixelFeatures, cached_encode
from clusiam.losses import cluster_similarity
from clusiam.models import PretrainModel
from clusiam.step import LossSettings, build_optimizer, training_step
from clusiam.train import train

WORLD = 2
BATCH = 8  # global batch of the equivalence test


def spawn(worker, tmp_path: Path, *args) -> None:
    """Run ``worker(*args)`` in WORLD gloo processes joined through a file store."""
    mp.spawn(_join, args=(worker, str(tmp_path / "store"), *args), nprocs=WORLD, join=True)


def _join(process: int, worker, store: str, *args) -> None:
    torch.set_num_threads(1)  # WORLD processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=process, world_size=WORLD)
    try:
        worker(*args)
    finally:
        dist.destroy_process_group()


def one_step(model_type: str, alpha: float, processes: int) -> dict:
    """One training step on fixed images and weights; this process takes its share of the
    global batch. Returns the losses averaged over processes, the gradients and the
    weights after the step (online and target)."""
    torch.manual_seed(0)
    model = PretrainModel(model_type, "resnet18", feat_size=32, num_clusters=6).eval()
    images = torch.rand(2, BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = slice(rank() * BATCH // processes, (rank() + 1) * BATCH // processes)
    network = DistributedDataParallel(model) if processes > 1 else model
    optimizer = build_optimizer(model, 0.5, 0.9, 1e-4, fix_pred_lr=False)
    options = LossSettings(alpha=alpha, tau=1.0, eps=1e-8)
    momentum = 0.9 if model.method.momentum_target else None
    output, losses = training_step(network, optimizer, images[0, rows], images[1, rows], options, False, momentum,
                                   torch.Generator().manual_seed(2))
    result = {name: float(sum_over_ranks(value) / processes) for name, value in losses.items()}
    if "cluster" in losses:
        result["cluster_this_rank"] = float(losses["cluster"].detach())
        # The same loss on this process's rows alone: what a loss without the gather would see.
        local_logits = torch.cat(output.cluster_logits).detach()
        result["cluster_local_only"] = float(cluster_similarity(
            torch.cat(output.projections), local_logits, 1.0, 1e-8, torch.Generator().manual_seed(2)))
    result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    result["weights"] = {name: value.clone() for name, value in model.state_dict().items()}
    return result


def one_step_worker(model_type: str, alpha: float, out: str) -> None:
    results = [None] * WORLD
    dist.all_gather_object(results, one_step(model_type, alpha, WORLD))
    if rank() == 0:
        torch.save(results, out)


def collectives_worker(out: str) -> None:
    me = rank()
    report = {"main_value": main_computes(lambda: f"computed by rank {me}")}
    report["gathered"] = gather_views([torch.tensor([[10.0 + me]]), torch.tensor([[20.0 + me]])]).flatten().tolist()
    report["earliest"] = int(earliest_step(torch.tensor(-1 if me == 0 else 5)))
    report["earliest_none"] = int(earliest_step(torch.tensor(-1)))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    check_replicas_agree(model)  # identical replicas pass
    if me == 1:
        with torch.no_grad():
            model.bias[1] += 1e-6
    try:
        check_replicas_agree(model)
        report["diverged"] = None
    except RuntimeError as error:
        report["diverged"] = str(error)
    try:
        train(parse_config(["--batch_size", "15", "--device", "cpu", "--save_path", str(Path(out).parent / "odd")]))
    except ConfigError as error:
        report["odd_batch"] = str(error)
    report["slides"] = shard(["a", "b", "c", "d"], sizes=[1, 10, 3, 7])
    # One file for two processes: rank 1 encodes nothing, and rank 0 still assembles the cache.
    patch = Path(out).parent / "patch.png"
    main_computes(lambda: Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(patch))
    features, _ = cached_encode(Path(out).parent / "cache", "pixels", PixelFeatures(2), [patch], [0.5] * 3, [0.25] * 3,
                                torch.device("cpu"), batch_size=1, num_workers=0)
    report["one_file_features"] = features.tolist()
    results = [None] * WORLD
    dist.all_gather_object(results, report)
    if me == 0:
        torch.save(results, out)
