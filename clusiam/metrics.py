"""Classification metrics and the pictures and tables that report them."""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    normalized_mutual_info_score,
    precision_recall_fscore_support,
)

from clusiam.errors import ConfigError
from clusiam.files import write_atomically
from clusiam.tables import write_csv


def positive_class(classes: Sequence[str], requested: str | None) -> str | None:
    """The class binary scores are about: ``--positive`` when given (it must be one of
    ``classes``), else ``tumor`` when present, else None."""
    if requested is not None and requested not in classes:
        raise ConfigError(f"--positive {requested!r} is not one of the classes {', '.join(classes)}")
    return requested or ("tumor" if "tumor" in classes else None)


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str],
                           positive: str | None) -> dict:
    """F1 of the positive class (binary: positive vs the rest), macro F1, accuracy,
    balanced accuracy, per-class precision/recall/F1/support, the confusion matrix (rows:
    true class, columns: predicted, in ``classes`` order) and ``warnings``.

    A score that a missing class leaves undefined is None, not 0: the F1 of a positive class
    that is not in the test set, the recall and F1 of any class not in the test set, the
    precision of a class never predicted. ``warnings`` says the last in words, for the
    report; :func:`absent_class_warnings` says what the test set itself leaves undefined.
    scikit-learn's own warnings about them are kept off the console."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    in_test, predicted = set(y_true.tolist()), set(y_pred.tolist())
    with warnings.catch_warnings():
        # UndefinedMetricWarning: a precision, recall or F1 of 0/0; "y_pred contains classes not in
        # y_true": balanced accuracy leaving such a class out. The report says both (see above).
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=list(classes), zero_division=0
        )
        metrics = {
            "f1": float(f1_score(y_true == positive, y_pred == positive, zero_division=0))
            if positive in in_test else None,
            # Over the classes of the test set, as balanced accuracy: the F1 of a class that is
            # only predicted (or only in the training split) is undefined, not 0.
            "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(in_test), average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        }
    never_predicted = [c for c in classes if c in in_test and c not in predicted]
    return {
        **metrics,
        "per_class": {
            c: {"precision": float(p) if c in predicted else None, "recall": float(r) if c in in_test else None,
                "f1": float(f) if c in in_test else None, "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(classes)).tolist(),
        "warnings": [f"{', '.join(never_predicted)} {'is' if len(never_predicted) == 1 else 'are'} never predicted: "
                     "precision undefined (- in the per-class table)"] if never_predicted else [],
    }


def cluster_agreement(labels: Sequence[str], clusters: Sequence[int], top: int = 5) -> dict[str, float]:
    """How well unsupervised clusters match class labels: normalised mutual information
    (0: independent, 1: the same partition) and the purity of the ``top`` largest clusters
    (the share of their patches that carry their cluster's most common label), which is what
    pictures of a few clusters' patches show by eye."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    names, sizes = np.unique(clusters, return_counts=True)
    largest = names[np.argsort(-sizes, kind="stable")[:top]]
    majority = sum(np.unique(labels[clusters == c], return_counts=True)[1].max() for c in largest)
    return {"cluster_nmi": float(normalized_mutual_info_score(labels, clusters)),
            f"cluster_purity_top{top}": float(majority / np.isin(clusters, largest).sum())}


def absent_class_warnings(y_true: Sequence[str], classes: Sequence[str], positive: str | None) -> list[str]:
    """What a test set without some of the classes leaves undefined, in words for a report."""
    in_test = sorted(set(y_true))
    absent = [c for c in classes if c not in in_test]
    notes = []
    if positive is not None and positive in absent:
        if len(in_test) == 1:
            notes.append(f"the test set holds only class {in_test[0]}: F1 of {positive} is undefined (null in "
                         f"report.json, - in report.md); add {positive} patches to the test set to score it")
        else:
            notes.append(f"the positive class {positive} does not occur in the test set: its F1 is undefined (null "
                         f"in report.json, - in report.md); add {positive} patches to the test set, or name "
                         "another class with --positive")
    if absent:
        notes.append(f"{', '.join(absent)} {'does' if len(absent) == 1 else 'do'} not occur in the test set: "
                     "recall and F1 undefined (- in the per-class table); macro F1 and balanced accuracy average over "
                     f"{', '.join(in_test)} only")
    return notes


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> None:
    """Counts and row-normalised shading (recall per true class)."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                      color="white" if shares[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_per_slide_accuracy(path: Path, slides: Sequence[str], y_true: Sequence[str], y_pred: Sequence[str],
                             positive: str | None) -> None:
    """One row per slide: patches, correct, accuracy, and (with a positive class) its true
    and predicted counts."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for slide, truth, prediction in zip(slides, y_true, y_pred):
        row = rows[slide]
        row[0] += 1
        row[1] += truth == prediction
        row[2] += truth == positive
        row[3] += prediction == positive
    counts = [f"true_{positive}", f"predicted_{positive}"] if positive else []
    write_csv(path, ["slide", "patches", "correct", "accuracy", *counts],
              [[slide, patches, correct, round(correct / patches, 4), *(positives if positive else [])]
               for slide, (patches, correct, *positives) in sorted(rows.items())])


def save_report(out: Path, report: dict, markdown: Sequence[str]) -> None:
    """``report.json`` (everything, written atomically) and ``report.md`` (the tables a person reads)."""
    write_atomically(out / "report.json", lambda temporary: temporary.write_text(json.dumps(report, indent=2)))
    (out / "report.md").write_text("\n".join(markdown) + "\n")
