"""Probes while pretraining: how well the current backbone separates labelled patches, every
``--probe_every`` epochs and after the last, logged beside the losses.

    python pretrain.py --config configs/clusiam.yaml DATA --probe patch_labels.csv --probe_every 5

The probe table (a CSV of ``path, label, slide``, a tiling job's ``slide, x, y, label``, or a
folder ``root/<class>/<slide>/``) is sampled once when the run starts (seeded, at most
``--probe_max_patches`` patches) and split by slide into a training and a test half, which
are written to ``SAVE_PATH/probe/train.csv`` and ``test.csv``: ``evaluate_knn.py`` on the
same checkpoint and those tables gives the same scores. Each probe encodes both halves with
the backbone as it stands (eval mode, no gradients, batched, shared out over torchrun's
processes) and scores the test half: the F1 of the positive class by top-1 and k = 20 KNN
and by the linear probe (:mod:`clusiam.linear_probe`), and for CluSiam / CluBYOL how well
the assigner's clusters of all probe patches agree with their labels
(:func:`clusiam.metrics.cluster_agreement`).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clusiam.best import PROBE_KS, PURITY_TOP, score_names
from clusiam.distributed import barrier, is_main, main_computes, share_main_buffers
from clusiam.errors import DataError, UserError, counted
from clusiam.features import assign_clusters, cluster_head, encode_shared
from clusiam.images import check_images
from clusiam.knn import choose_backend, knn_predictions
from clusiam.linear_probe import train_linear_probe
from clusiam.metrics import classification_metrics, cluster_agreement, positive_class
from clusiam.models import PretrainModel
from clusiam.slide_source import job_pairs, named_pairs
from clusiam.sources import FolderSource, seeded_sample
from clusiam.splits import LabelledPatches, read_labelled_patches, split_by_slide, table_rows
from clusiam.tables import write_csv

FOLDER = "probe"  # in SAVE_PATH: the probe's two tables
SPLIT_SEED = 0


@dataclass
class ProbePlan:
    """The probe's split, made once by rank 0 before the run folder exists: the rows of its
    two tables, and where slide tables find their slides."""

    header: list[str]
    train_rows: list[list]
    test_rows: list[list]
    job: Path | None  # the tiling job of a table of slide corners
    positive: str
    table: str
    every: int  # --probe_every

    def start(self, save_path: Path, clustered: bool) -> Probe:
        """Write the probe's tables into the run folder (rank 0) and read them back (every rank)."""
        folder = save_path / FOLDER
        tables = (folder / "train.csv", folder / "test.csv")
        if is_main():
            folder.mkdir(exist_ok=True)
            for path, rows in zip(tables, (self.train_rows, self.test_rows)):
                write_csv(path, self.header, rows)
        barrier()
        pairs = None if self.job is None else named_pairs(job_pairs(self.job))
        train, test = (read_labelled_patches(path, pairs) for path in tables)
        probe = Probe(train, test, sorted(set(train.labels) | set(test.labels)), self.positive, self.every, clustered)
        if is_main():
            absent = self.positive not in test.labels
            missing = f"; its test half has no {self.positive} patch: F1 stays empty" if absent else ""
            print(f"probe: {len(train)} / {len(test)} patches of {len(set(train.slides))} / {len(set(test.slides))} "
                  f"slides from {self.table} ({folder}){missing}")
        return probe


@dataclass
class Probe:
    """The probe's two halves, read back from the tables it wrote, and what it scores."""

    train: LabelledPatches
    test: LabelledPatches
    classes: list[str]
    positive: str
    every: int
    clustered: bool  # the method has clusters to compare with the labels

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether the epoch just finished (counted from 0) is probed: every ``every`` epochs, and the last."""
        return (epoch + 1) % self.every == 0 or epoch + 1 == epochs

    def run(self, model: PretrainModel, mean: Sequence[float], std: Sequence[float], device: torch.device,
            batch_size: int, num_workers: int) -> dict[str, float | None] | None:
        """Encode both halves with the backbone as it stands (with rank 0's BatchNorm statistics,
        the checkpoint's) and score them; every process encodes its share, rank 0 scores (the
        others get None). The model is left in the mode it was in."""
        started = time.perf_counter()
        share_main_buffers(model)
        was_training = model.training
        try:
            features = [encode_shared(model.backbone, half.source, mean, std, device, batch_size=batch_size,
                                      num_workers=num_workers, desc=f"probe {name}")
                        for name, half in (("train", self.train), ("test", self.test))]
            values = main_computes(lambda: self.score(model, *features, device))
        finally:
            model.train(was_training)
        values["seconds"] = round(time.perf_counter() - started, 3)
        return values if is_main() else None

    def score(self, model: PretrainModel, train: np.ndarray, test: np.ndarray,
              device: torch.device) -> dict[str, float | None]:
        """KNN and linear F1 of the positive class on the test half, and the clusters' agreement
        with the labels over both halves."""
        def f1(predicted: Sequence[str]) -> float | None:
            return classification_metrics(self.test.labels, predicted, self.classes, self.positive)["f1"]

        predicted = knn_predictions(train, self.train.labels, test, PROBE_KS, self.classes,
                                    choose_backend("auto", max(PROBE_KS)))
        values = {f"knn_f1_k{k}": f1(predicted[k]) for k in PROBE_KS}
        linear = train_linear_probe(train, self.train.labels, self.train.slides, "auto", device)
        values["linear_f1"] = f1(linear.predict(test))
        head = cluster_head(model)
        if head is not None:
            clusters = assign_clusters(head, np.concatenate([train, test]))
            values.update(cluster_agreement([*self.train.labels, *self.test.labels], clusters, PURITY_TOP))
        return values

    def row(self, values: dict[str, float | None] | None) -> dict[str, float | str]:
        """The probe's ``epochs.csv`` cells: its scores, or empty cells in an epoch it did not
        run (and for a score left undefined), so every row has the same columns."""
        values = values or {}
        return {f"probe_{name}": "" if values.get(name) is None else values[name]
                for name in [*score_names(self.clustered), "seconds"]}

    @staticmethod
    def summary(values: dict[str, float | None], epoch_seconds: float) -> str:
        """A probe's scores in one line, with its time as a share of the epoch's."""
        scores = ", ".join(f"{name} {'-' if value is None else f'{value:.4f}'}"
                           for name, value in values.items() if name != "seconds")
        share = 100 * values["seconds"] / max(epoch_seconds, 1e-9)
        return f"{scores} ({values['seconds']:.1f} s, {share:.1f} % of the epoch's {epoch_seconds:.1f} s)"


def plan_probe(args: argparse.Namespace) -> ProbePlan:
    """Read and check ``--probe``, sample it and split it by slide; nothing is written."""
    table = Path(args.probe)
    try:
        patches = read_labelled_patches(table)
        if isinstance(patches.source, FolderSource):  # slides are checked as they are read
            check_images(patches.source.files, 1, skip_bad_files=False, same_size=True)
    except UserError as error:  # named once: the message of a table's own fault starts with its path
        text = str(error)
        raise type(error)(f"--probe {text}" if text.startswith(str(table)) else f"--probe {table}: {text}") from None
    positive = positive_class(sorted(set(patches.labels)), args.probe_positive)
    if positive is None:
        raise DataError(f"--probe {table}: no class is named tumor; name the positive class with --probe_positive "
                        f"(one of {', '.join(sorted(set(patches.labels)))})")
    sample = seeded_sample(len(patches), args.probe_max_patches, SPLIT_SEED)
    slides = [patches.slides[i] for i in sample]
    if len(set(slides)) < 2:
        raise DataError(f"--probe {table}: its patches come from one slide, and the probe splits by slide: use a "
                        "table of patches from several slides")
    train, test = split_by_slide([patches.labels[i] for i in sample], slides, 2, SPLIT_SEED)
    if len(train) < max(PROBE_KS):
        raise DataError(f"--probe {table}: its training half holds {counted(len(train), 'patch', 'patches')}, fewer "
                        f"than the k = {max(PROBE_KS)} the probe scores: use a table of more patches")
    header, rows = table_rows(patches, sample)
    job = None if isinstance(patches.source, FolderSource) else table.parent
    return ProbePlan(header, [rows[i] for i in train], [rows[i] for i in test], job, positive, str(table),
                     args.probe_every)

