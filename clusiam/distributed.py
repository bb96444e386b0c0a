"""Running as one of several processes started by ``torchrun`` (one per GPU, any number of
nodes sharing a file system), and the few collective operations the rest of clusiam needs.

Without torchrun every helper here is the identity and nothing is initialised, so the
single-process path is the plain one. Under torchrun, ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` come from the environment; GPUs talk over NCCL, CPUs over gloo (which is
what the CPU tests use).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from lightly.utils.dist import gather, world_size
from torch import Tensor, nn

from clusiam.errors import ConfigError

T = TypeVar("T")
DEVICE_HELP = "auto (a GPU when one is visible), cpu, cuda or cuda:N"  # what every --device takes (resolve_device)


def resolve_device(name: str) -> torch.device:
    """The device of a ``--device`` option: auto (a GPU when one is visible), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def positive_minutes(text: str) -> float:
    minutes = float(text)
    if not minutes > 0:
        raise argparse.ArgumentTypeError(f"must be positive minutes (got {text})")
    return minutes


def add_dist_timeout(parser: argparse.ArgumentParser | argparse._ArgumentGroup, longest_wait: str) -> None:
    """``--dist_timeout``: how long a torchrun process waits in a collective before failing;
    it has to cover the longest time one process works while the others wait."""
    parser.add_argument("--dist_timeout", default=30.0, type=positive_minutes,
                        help=f"under torchrun: minutes a process waits for the others in a collective before it "
                             f"fails (covers {longest_wait})")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (torchrun's RANK also before and after the process group)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that writes files and prints: rank 0, or the only process."""
    return rank() == 0


@contextlib.contextmanager
def processes(device_option: str, timeout_minutes: float = 30.0) -> Iterator[torch.device]:
    """Join the torchrun job (if any) for the duration of the block; yield this process's
    device. ``--device auto`` or ``cuda`` under torchrun means the GPU numbered LOCAL_RANK.

    ``timeout_minutes`` bounds every collective: a rank left waiting for a peer that hangs
    raises instead of waiting forever (torchrun itself ends the job when a peer dies).
    """
    if not launched_by_torchrun():
        device = resolve_device(device_option)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # for what defaults to the current GPU: faiss, synchronize, memory stats
        yield device
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_option.startswith("cuda:"):
        raise ConfigError(f"--device {device_option}: under torchrun each process uses the GPU numbered by its "
                          "LOCAL_RANK; pass --device auto (or cuda), and choose GPUs with CUDA_VISIBLE_DEVICES")
    device = resolve_device(device_option)
    on_gpu = device.type == "cuda"
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                              "pass torchrun a --nproc_per_node no larger than the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if on_gpu else None)
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and is_main():
        # pytorch/pytorch#135712: through the store torchrun shares with its processes, a
        # restarted group can read the dead processes' addresses and fail to connect.
        print(f"warning: --max_restarts {restarts} with torchrun's shared store: restarts may fail to reconnect; "
              "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see README, multi-GPU)")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def main_computes(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only (work that writes files or is costly: the demo set,
    the image check, the statistics) and hand its picklable result to every rank."""
    if world_size() == 1:
        return compute()
    result = [compute() if is_main() else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's picklable ``value``, in rank order, on rank 0 (None on the others)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_views(views: Sequence[Tensor]) -> Tensor:
    """The rows of every rank, view by view: [view 1 of rank 0, view 1 of rank 1, ...,
    view 2 of rank 0, ...], which is the single-process ``torch.cat(views)`` of the global
    batch. Gradients flow back to each rank's own rows (lightly's GatherLayer sums them
    over ranks; every rank computes the same loss and DDP averages, so they come out once)."""
    if world_size() == 1:
        return torch.cat(list(views))
    return torch.cat([row for view in views for row in gather(view.contiguous())])


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a copy; no gradient)."""
    total = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def earliest_step(step: Tensor) -> Tensor:
    """The smallest non-negative value of a step counter over all ranks (-1 when every
    rank holds -1), so that every rank stops at the same logged step."""
    if world_size() == 1:
        return step
    never = torch.iinfo(torch.long).max
    earliest = torch.where(step < 0, torch.full_like(step, never), step)
    dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
    return torch.where(earliest == never, torch.full_like(earliest, -1), earliest)


def check_replicas_agree(module: nn.Module) -> None:
    """Raise unless every rank holds exactly rank 0's parameters (online and target
    networks): DDP and the momentum update must keep the replicas bit-identical."""
    if world_size() == 1:
        return
    local = torch.stack([p.detach().double().sum() for p in module.parameters()])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    differs = (local != reference).any().to(torch.int32)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if differs:
        names = [n for (n, _), a, b in zip(module.named_parameters(), local, reference) if a != b]
        detail = f" (rank {rank()} differs in {', '.join(names[:3])})" if names else ""
        raise RuntimeError(f"the model replicas diverged across ranks{detail}: this is a bug, please report it")


def share_main_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP sends them at the
    start of each forward, so after the last training step each rank still holds the ones its
    own batch left; an evaluation every rank takes part in must use the checkpoint's (rank 0's)."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shard(items: Sequence[T], sizes: Sequence[int] | None = None) -> list[T]:
    """This rank's share of ``items``: every world_size-th item from position rank or, with
    ``sizes``, the items :func:`balanced_owners` gives this rank, so that ranks holding big
    and small slides finish together instead of idling at the next collective."""
    if sizes is None:
        return list(items[rank()::world_size()])
    owners = balanced_owners(sizes, world_size())
    return [item for item, owner in zip(items, owners) if owner == rank()]


def balanced_owners(sizes: Sequence[int], processes: int) -> list[int]:
    """The process of each item: largest first, each to the process with the least so far
    (ties to the lowest rank), the same on every rank."""
    loads, owners = [0] * processes, [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = loads.index(min(loads))
        owners[index] = owner
        loads[owner] += sizes[index]
    return owners
