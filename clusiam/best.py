"""The best probed epoch kept (``--keep_best METRIC``): beside ``last.pth``, a run that probes
keeps ``best.pth``, the checkpoint of the probed epoch with the highest METRIC so far, so that
an encoder that was good before a late collapse is not lost.

    python pretrain.py --config configs/clusiam.yaml DATA --probe patch_labels.csv --keep_best knn_f1_k20

best.pth is the very dict that last.pth held after that epoch, so every command that reads a
checkpoint reads it. Every checkpoint of the run records which epoch best.pth holds, as
``best = {"metric", "value", "epoch"}`` (plain values), and so does each row of
``logs/epochs.csv`` (``best_epoch``); a resumed run goes on from its checkpoint's record and
ends with the best.pth an uninterrupted run would have.

The probe's score names live here rather than in :mod:`clusiam.probe` so that pretrain.py's
options are checked against them without importing scikit-learn.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from clusiam.checkpoint import load_checkpoint, save_checkpoint
from clusiam.distributed import is_main
from clusiam.errors import ConfigError

PROBE_KS = (1, 20)  # top-1, the paper's score, and a vote of 20, the usual k of the frameworks' monitors
PURITY_TOP = 5
BEST_FILE = "best.pth"  # in SAVE_PATH


def score_names(clustered: bool) -> list[str]:
    """The probe's scores, each higher-is-better: the positive class's F1 by KNN and by the
    linear probe, and for a method with clusters their agreement with the labels."""
    names = [*(f"knn_f1_k{k}" for k in PROBE_KS), "linear_f1"]
    return names + (["cluster_nmi", f"cluster_purity_top{PURITY_TOP}"] if clustered else [])


@dataclass
class Best:
    """The best probed epoch so far by ``metric``, which SAVE_PATH/best.pth holds."""

    metric: str
    value: float | None = None
    epoch: int | None = None  # epochs completed; None until a probed epoch has a score

    @classmethod
    def of(cls, record: dict | None) -> Best | None:
        """The best a checkpoint records (None: it kept none)."""
        return None if record is None else cls(record["metric"], record["value"], record["epoch"])

    def record(self) -> dict[str, str | float | int | None]:
        """What a checkpoint records: plain values, so that it loads with weights_only=True."""
        return dataclasses.asdict(self)

    def row(self) -> dict[str, int | str]:
        """The ``epochs.csv`` cell: the epoch best.pth holds after this row's (empty: none yet)."""
        return {"best_epoch": "" if self.epoch is None else self.epoch}

    def describe(self) -> str:
        """The best in words, for messages."""
        return "no epoch" if self.epoch is None else f"epoch {self.epoch} ({self.metric} {self.value:.4f})"

    def update(self, scores: dict[str, float | None] | None, epoch: int) -> str | None:
        """Take ``epoch`` (counted from 1) as the best when its score beats the best so far:
        strictly, so that a tie keeps the earlier epoch; the first score sets it, and an
        undefined one (None, NaN) never does. Returns the line that says so, or None when
        best.pth stays as it is."""
        value = None if scores is None else scores.get(self.metric)
        if value is None or math.isnan(value) or (self.value is not None and value <= self.value):
            return None
        was = "the first score" if self.value is None else f"beats {self.value:.4f} of epoch {self.epoch}"
        self.value, self.epoch = float(value), epoch
        return f"best (epoch {epoch}): {self.metric} {value:.4f}, {was}; kept in {BEST_FILE}"

    def restore(self, checkpoint: dict, save_path: Path) -> None:
        """Where the resumed checkpoint records itself as the best, write best.pth from it (on
        rank 0): a run stopped after last.pth and before best.pth (killed, or a full disk) left
        an older best.pth. Written even where it is already there, which costs one write per
        resume and no second reading. Call it before the first step: the optimizer restored
        from the checkpoint shares its tensors (``load_state_dict`` keeps them), and steps change them."""
        if is_main() and self.epoch is not None and self.epoch == checkpoint["epoch"]:
            save_checkpoint(checkpoint, save_path / BEST_FILE)


def resumed_best(metric: str | None, checkpoint: dict | None, resume: Path | None, save_path: Path) -> Best | None:
    """The best this run goes on from (None: no --keep_best). A new run starts with none; a
    resumed run goes on from the best its checkpoint records where SAVE_PATH/best.pth holds it
    (see :func:`accounts_for`), else starts over, saying so. A best.pth that the checkpoint does
    not account for (kept by another metric, of epochs after the checkpoint, another run's) is
    never written over: the run is refused, naming it. Nothing is written here."""
    if metric is None:
        return None
    if checkpoint is None:
        return Best(metric)
    recorded = Best.of(checkpoint.get("best"))
    path = save_path / BEST_FILE
    kept = Best.of(load_checkpoint(path).get("best")) if path.is_file() else None
    resumed_at = checkpoint["epoch"]
    if accounts_for(recorded, kept, resumed_at):
        if recorded is not None and recorded.metric == metric:
            return recorded
        if kept is not None:
            raise ConfigError(f"--keep_best {metric}: {path} holds the best by {kept.metric}, {kept.describe()}: "
                              f"pass --keep_best {kept.metric} to go on keeping it, or move it out of {save_path} "
                              f"to keep the best by {metric} from epoch {resumed_at + 1} on")
    elif kept is not None:
        recorded_text = "none" if recorded is None else recorded.describe()
        raise ConfigError(f"--keep_best {metric}: {path} holds {kept.describe()}, which the resumed checkpoint "
                          f"{resume} does not record as its best ({recorded_text}): move it out of {save_path} to "
                          "keep a new best there")
    if recorded is not None and recorded.epoch is not None:
        print(f"note: --keep_best {metric} keeps the best of epochs {resumed_at + 1} on: {save_path} holds no "
              f"{BEST_FILE} of the resumed checkpoint's best, {recorded.describe()}")
    return Best(metric)


def accounts_for(recorded: Best | None, kept: Best | None, resumed_at: int) -> bool:
    """Whether best.pth as found (``kept``; None: there is none) is what the resumed checkpoint
    (of epoch ``resumed_at``) records as its best (``recorded``), or is about to be: where the
    checkpoint records itself as the best, :meth:`Best.restore` writes best.pth from it, over
    none or over an earlier best by the same metric (what a run stopped between last.pth and
    best.pth leaves)."""
    due = recorded if recorded is not None and recorded.epoch is not None else None
    if kept == due:
        return True
    return due is not None and due.epoch == resumed_at and (
        kept is None or (kept.metric == due.metric and kept.epoch < due.epoch))
