"""The linear probe: logistic regression on frozen, standardised features, the patch-level
score self-supervised methods report beside k-NN (as in SimCLR, DINO and the pathology
benchmarks eva and Patho-Bench).

The regularisation strength C is chosen on a validation split by slide inside the training
set (no test patch takes part), the probe is then refitted on every training patch with
that C, and the caller scores the test set once. Two solvers minimise the same objective,
mean log-loss + ||W||^2 / (2 C N) with the intercept unpenalised (scikit-learn's
``LogisticRegression``): scikit-learn (lbfgs) for sets that fit it, and full-batch L-BFGS
in torch, over row chunks, for large sets on a GPU. A binary problem has one logit (a
sigmoid), as in scikit-learn; more classes have a softmax.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from clusiam.errors import ConfigError
from clusiam.metrics import classification_metrics
from clusiam.splits import split_by_slide

C_GRID = tuple(10.0 ** power for power in range(-4, 3))  # 1e-4 ... 1e2, the usual log grid
VALIDATION_FOLDS = 4  # a quarter of the training slides validate C
DEFAULT_C = 1.0  # scikit-learn's, used when no validation split by slide is possible
SOLVERS = ("auto", "sklearn", "torch")
TORCH_FROM_VALUES = 20_000_000  # training rows x width from which, with a GPU, auto takes the torch solver
ROW_CHUNK = 262_144  # rows per chunk of the torch solver's loss
CPU = torch.device("cpu")


@dataclass
class LinearModel:
    """A fitted probe: standardisation, then logits = x W^T + b (one row of W when binary)."""

    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    def predict(self, features: np.ndarray) -> list[str]:
        if len(self.classes) == 1:
            return [self.classes[0]] * len(features)
        logits = standardise(features, self.mean, self.std) @ self.weight.T + self.bias
        index = (logits[:, 0] > 0).astype(int) if len(self.classes) == 2 else logits.argmax(1)
        return [self.classes[i] for i in index]


@dataclass
class LinearProbe:
    """The probe refitted on all training patches, the C chosen, and how it was chosen."""

    model: LinearModel
    c: float
    solver: str
    validation_macro_f1: dict[str, float] = field(default_factory=dict)  # per C, on the validation slides
    warnings: list[str] = field(default_factory=list)

    def predict(self, features: np.ndarray) -> list[str]:
        return self.model.predict(features)


def standardise(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (np.asarray(features, dtype=np.float32) - mean) / std


def choose_solver(requested: str, values: int, device: torch.device) -> str:
    """``auto``: torch on a GPU for large sets (rows x width of at least TORCH_FROM_VALUES),
    scikit-learn otherwise."""
    if requested not in SOLVERS:
        raise ConfigError(f"--linear_solver {requested!r} is unknown; choose one of {', '.join(SOLVERS)}")
    if requested != "auto":
        return requested
    return "torch" if device.type == "cuda" and values >= TORCH_FROM_VALUES else "sklearn"


def fit(features: np.ndarray, labels: Sequence[str], c: float, solver: str,
        device: torch.device = CPU) -> LinearModel:
    """Standardise with the training features' own mean and std, and fit at strength ``c``."""
    features = np.asarray(features, dtype=np.float32)
    classes = sorted(set(labels))
    mean, std = features.mean(0), np.maximum(features.std(0), 1e-6)
    if len(classes) == 1:  # nothing to separate: every patch is that class
        return LinearModel(classes, mean, std, np.zeros((0, features.shape[1]), np.float32), np.zeros(0, np.float32))
    x = standardise(features, mean, std)
    y = np.searchsorted(classes, labels)
    weight, bias = (fit_sklearn if solver == "sklearn" else fit_torch)(x, y, len(classes), c, device)
    return LinearModel(classes, mean, std, weight, bias)


def fit_sklearn(x: np.ndarray, y: np.ndarray, num_classes: int, c: float,
                device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # at the grid's weakest C: the choice still stands
        model = LogisticRegression(C=c, max_iter=1000, tol=1e-6).fit(x, y)
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32)


def fit_torch(x: np.ndarray, y: np.ndarray, num_classes: int, c: float,
              device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's objective minimised by full-batch L-BFGS on ``device``, the loss summed
    over chunks of rows so that memory holds the features and one chunk's logits."""
    features = torch.from_numpy(x).to(device)
    targets = torch.from_numpy(y).to(device)
    outputs = 1 if num_classes == 2 else num_classes
    weight = torch.zeros(outputs, x.shape[1], device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(outputs, device=device, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=1000, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        total = weight.square().sum() / (2 * c * len(x))
        total.backward()
        for start in range(0, len(x), ROW_CHUNK):
            logits = features[start : start + ROW_CHUNK].double() @ weight.T + bias
            chunk = targets[start : start + ROW_CHUNK]
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], chunk.double(), reduction="sum")
                    if outputs == 1 else F.cross_entropy(logits, chunk, reduction="sum")) / len(x)
            loss.backward()
            total = total + loss.detach()
        return total

    optimizer.step(objective)
    return weight.detach().float().cpu().numpy(), bias.detach().float().cpu().numpy()


def train_linear_probe(features: np.ndarray, labels: Sequence[str], slides: Sequence[str], solver: str = "auto",
                       device: torch.device = CPU, seed: int = 0) -> LinearProbe:
    """Choose C on validation slides (macro F1 over the classes they hold; ties go to the
    smaller C, the stronger regularisation), then refit on every training patch."""
    features = np.asarray(features, dtype=np.float32)
    labels = list(labels)
    solver = choose_solver(solver, features.size, device)
    if len(set(labels)) == 1:  # the report says so (every test patch is predicted that class)
        return LinearProbe(fit(features, labels, DEFAULT_C, solver, device), DEFAULT_C, solver)
    notes = []
    folds = min(VALIDATION_FOLDS, len(set(slides)))
    split = split_by_slide(labels, slides, folds, seed) if folds >= 2 else None
    if split is None:
        notes.append("the training set has one slide, so C could not be chosen on validation slides: "
                     f"C = {DEFAULT_C:g}")
    elif len(set(labels[i] for i in split[0])) < 2 or len(set(labels[i] for i in split[1])) < 2:
        notes.append("the validation split by slide leaves one class on a side, so C could not be chosen there: "
                     f"C = {DEFAULT_C:g}; add slides of each class to the training set")
        split = None
    scores: dict[str, float] = {}
    if split is not None:
        fit_rows, val_rows = split
        val_labels = [labels[i] for i in val_rows]
        for c in C_GRID:
            model = fit(features[fit_rows], [labels[i] for i in fit_rows], c, solver, device)
            predicted = model.predict(features[val_rows])
            scores[f"{c:g}"] = classification_metrics(val_labels, predicted, model.classes, None)["macro_f1"]
    best = max(C_GRID, key=lambda c: (scores[f"{c:g}"], -c)) if scores else DEFAULT_C
    return LinearProbe(fit(features, labels, best, solver, device), best, solver, scores, notes)
