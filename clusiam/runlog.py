"""What a pretraining run records: per-step scalars in TensorBoard, per-epoch averages in
``logs/epochs.csv``, and the collapse diagnostics behind the warnings.

Losses stay on the device until a logged step reads them, so the step loop never waits
for the GPU; the first non-finite loss is remembered on the device too, and caught at the
next logged step.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from clusiam.distributed import earliest_step, gather_views, is_main, sum_over_ranks, world_size
from clusiam.errors import NonFiniteLossError
from clusiam.files import reporting_full_disk, write_atomically
from clusiam.models import PretrainOutput
from clusiam.monitor import cluster_diagnostics, projection_std
from clusiam.tables import write_csv


class EpochLog:
    """One epoch's record: its learning rate, loss sums and the first non-finite step (kept
    on the device until read), and the diagnostics of its logged steps."""

    def __init__(self, lr: float, diagnostic_names: Sequence[str], device: torch.device) -> None:
        self.lr = lr
        self.loss_sums: torch.Tensor | None = None
        self.loss_names: list[str] = []
        self.steps = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.diagnostic_sums = dict.fromkeys(diagnostic_names, 0.0)
        self.diagnostic_count = 0

    def add_losses(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([value.detach() for value in losses.values()])
        self.loss_names = list(losses)
        self.loss_sums = values if self.loss_sums is None else self.loss_sums + values
        self.steps += 1
        bad = ~torch.isfinite(losses["loss"].detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def stop_if_nonfinite(self, epoch: int, last: Path) -> None:
        bad_step = int(earliest_step(self.first_bad_step))  # every rank stops at the same step
        if bad_step >= 0:
            kept = f"the last good checkpoint {last} is untouched" if last.is_file() else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad_step} (epoch {epoch + 1}); training stopped and {kept}. "
                "Lower --lr, or look for corrupt images in the data."
            )

    def add_diagnostics(self, diagnostics: dict[str, float]) -> None:
        for key, value in diagnostics.items():
            self.diagnostic_sums[key] += value
        self.diagnostic_count += 1

    def averages(self) -> dict[str, float]:
        """Mean losses over the epoch's steps and all processes, and mean diagnostics over its
        logged steps (at least its last)."""
        losses = (sum_over_ranks(self.loss_sums) / (self.steps * world_size())).tolist()
        result = dict(zip(self.loss_names, losses))
        result.update({k: v / self.diagnostic_count for k, v in self.diagnostic_sums.items()})
        return result


def step_diagnostics(output: PretrainOutput, generator: torch.Generator) -> dict[str, float]:
    """Collapse signals of one step over the global batch (this reads values back to the
    host: logged steps only). ``generator`` is the diagnostics' own Gumbel noise."""
    diagnostics = {"projection_std": projection_std(gather_views(output.projections))}
    if output.cluster_logits is not None:
        diagnostics.update(cluster_diagnostics(gather_views([a.detach() for a in output.cluster_logits]), generator))
    return {name: float(value) for name, value in diagnostics.items()}


def mean_over_ranks(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """This step's losses averaged over the processes, on the host."""
    values = sum_over_ranks(torch.stack([value.detach() for value in losses.values()])) / world_size()
    return dict(zip(losses, values.tolist()))


class RunLog:
    """TensorBoard scalars (``train/<name>`` by step) and the per-epoch CSV; only rank 0
    writes (the other processes hold a log that does nothing)."""

    def __init__(self, log_dst: Path) -> None:
        self.log_dst = log_dst
        self.csv_path = log_dst / "epochs.csv"
        self.main = is_main()
        self.writer: SummaryWriter | None = None  # made with the first scalar (restoring a row writes none)

    def scalars(self, values: dict[str, float | None], step: int, group: str = "train") -> None:
        """``group/<name>`` at ``step``; an undefined value (None) is left out."""
        if not self.main:
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dst))
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def epoch_row(self, row: dict[str, float]) -> None:
        """Append an epoch's row (written once its checkpoint is on disk). A row with columns
        the file lacks (a resumed run that probes, where the first did not) rewrites the file
        with every column, the earlier rows' new cells empty."""
        if not self.main:
            return
        header = self.header()
        added = [name for name in row if name not in (header or [])]
        if header and added:
            fields = header + added
            cells = [[line.get(name, "") for name in fields] for line in [*self.rows(), row]]
            write_atomically(self.csv_path, lambda temporary: write_csv(temporary, fields, cells))
        else:
            with reporting_full_disk(self.csv_path), open(self.csv_path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header or list(row), restval="")
                if not header:
                    writer.writeheader()
                writer.writerow(row)
        if self.writer is not None:
            self.writer.flush()

    def header(self) -> list[str] | None:
        """The columns of ``epochs.csv``; None before it has any."""
        if not self.csv_path.is_file():
            return None
        with open(self.csv_path, newline="") as handle:
            return next(csv.reader(handle), None)

    def rows(self) -> list[dict[str, str]]:
        """The rows of ``epochs.csv`` so far."""
        if not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline="") as handle:
            return list(csv.DictReader(handle))

    def restore_row(self, checkpoint: dict) -> None:
        """Append the row of the checkpoint's epoch when the CSV lacks it: a run stopped between
        saving its checkpoint and writing the row resumes with the row written."""
        row = checkpoint.get("log_row")
        if row is None or not self.main:
            return
        if row["epoch"] not in {int(float(line["epoch"])) for line in self.rows()}:
            self.epoch_row(row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
