"""Slide classification on frozen patch features with DSMIL (or ABMIL, or a pooling baseline), under
a protocol that does not leak: the best epoch and the decision thresholds come from the
validation slides; the test slides are scored once, after training (before it, their bags
are only checked: present, made alike, finite).

    python -m mil.train --feats feats/ --labels slides.csv [--split split.csv] --out reports/mil

``slides.csv`` has columns slide, label; ``split.csv`` columns slide, split (train / val /
test). Without a split file the slides are split by seeded stratified sampling. ``--folds K``
cross-validates on the non-test slides, ``--seeds N`` repeats every run with N seeds; the
report gives each run and the mean and standard deviation. The report also counts the test
slides that the encoder of the bags saw in pretraining (its checkpoint's leakage ledger);
``--refuse_seen`` makes any an error.
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm import tqdm

from clusiam.checkpoint import load_checkpoint
from clusiam.distributed import DEVICE_HELP, resolve_device
from clusiam.errors import CommandParser, ConfigError, DataError, InRange, report_command_line
from clusiam.files import check_output_folder, file_digest, make_folder
from clusiam.ledger import SEEN_LABEL, SeenInPretraining, pretraining_slides
from clusiam.metrics import positive_class, save_report
from clusiam.tables import read_table, write_csv
from mil.compute_feats import ENCODING_ATTRIBUTES, bag_encoding
from mil.dsmil import AGGREGATORS

SPLITS = ("train", "val", "test")


@dataclass
class Bag:
    slide: str
    label: str
    features: torch.Tensor  # (N, D)
    coords: np.ndarray | None  # (N, 2) level-0 pixel positions, when known


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m mil.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--feats", required=True, help="folder of <slide>.h5 bags (mil.compute_feats)")
    parser.add_argument("--labels", required=True, help="CSV with columns slide, label")
    parser.add_argument("--split", default=None,
                        help="CSV with columns slide, split (train/val/test); e.g. the official Camelyon16 split "
                             "(default: a seeded stratified split, see --test_fraction and --val_fraction)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--positive", default=None, help="the positive class (default: tumor when present)")
    parser.add_argument("--num_classes", type=int, default=2, choices=[1, 2],
                        help="2: independent sigmoids for negative and positive (the CluSiam table); 1: one sigmoid")
    parser.add_argument("--aggregator", default="dsmil", choices=list(AGGREGATORS),
                        help="the MIL model: DSMIL (the paper's), ABMIL (gated attention), or max or mean pooling")
    parser.add_argument("--average", default=True, action=argparse.BooleanOptionalAction,
                        help="DSMIL's score = mean of sigmoid(bag) and sigmoid(max instance) (its 2023 default)")
    parser.add_argument("--epochs", type=int, default=50, action=InRange, at_least=1)
    parser.add_argument("--lr", type=float, default=2e-4, action=InRange, above=0)
    parser.add_argument("--weight_decay", type=float, default=5e-3, action=InRange, at_least=0)
    parser.add_argument("--min_lr", type=float, default=5e-6, action=InRange, at_least=0,
                        help="end of the cosine schedule")
    parser.add_argument("--patience", type=int, default=0, action=InRange, at_least=0,
                        help="stop after this many epochs without a better validation score (0: never)")
    parser.add_argument("--folds", type=int, default=0,
                        help="K-fold cross-validation on the non-test slides, val included (0: use the split's val)")
    parser.add_argument("--seeds", type=int, default=1, action=InRange, at_least=1,
                        help="repeat each run with seeds 0 .. N-1")
    parser.add_argument("--split_seed", type=int, default=0, action=InRange, at_least=0,
                        help="seed of the split made when no --split is given")
    parser.add_argument("--test_fraction", type=float, default=0.2, action=InRange, above=0, below=1,
                        help="share of the slides for testing, when no --split is given")
    parser.add_argument("--val_fraction", type=float, default=0.25, action=InRange, above=0, below=1,
                        help="share of the non-test slides for validation, when no --split is given")
    parser.add_argument("--refuse_seen", action="store_true",
                        help="stop when the bags' checkpoint saw any test slide in pretraining (or that is unknown)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser


def make_split(labels: dict[str, str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded stratified train / val / test split of the slides."""
    slides = sorted(labels)
    rest, test = train_test_split(slides, test_size=test_fraction, stratify=[labels[s] for s in slides],
                                  random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction, stratify=[labels[s] for s in rest], random_state=seed)
    return {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}


def check_split(split: dict[str, str], labels: dict[str, str], folds: int) -> None:
    """Every slide in exactly one known split, and both classes wherever an AUC is taken: a
    split with one class has no AUC, and is refused rather than scored as 1. With ``folds``
    the validation slides are folds of the non-test slides, so the split needs no val (the
    official Camelyon16 split has only train and test), but every fold needs both classes."""
    unknown = sorted({name for name in split.values() if name not in SPLITS})
    if unknown:
        raise DataError(f"unknown split name(s) {', '.join(unknown)}: use train, val, test")
    unlabelled = sorted(set(split) - set(labels))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} slide(s) in the split have no label, e.g. {unlabelled[0]}")
    if folds:
        pool = Counter(labels[s] for s, where in split.items() if where != "test")
        if len(pool) < 2 or min(pool.values()) < folds:
            raise DataError(f"--folds {folds} needs at least {folds} slides of each class outside the test split "
                            f"(found {dict(sorted(pool.items()))})")
    for name in ("test",) if folds else SPLITS:
        classes = {labels[s] for s, where in split.items() if where == name}
        if len(classes) < 2:
            hint = " (or use --folds K to validate on folds of the train slides)" if name == "val" else ""
            holds = "no slides" if not classes else f"only {classes.pop()} slides"
            raise DataError(f"the {name} split holds {holds}: "
                            f"every split needs both classes (an AUC over one class is undefined){hint}")


def runs(split: dict[str, str], labels: dict[str, str], folds: int, seeds: int, seed: int) -> list[dict]:
    """(seed, fold, train slides, val slides) for every run; test slides are never here."""
    pool = sorted(s for s, where in split.items() if where != "test")
    if folds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        partitions = [([pool[i] for i in train], [pool[i] for i in val])
                      for train, val in splitter.split(pool, [labels[s] for s in pool])]
    else:
        partitions = [([s for s in pool if split[s] == "train"], [s for s in pool if split[s] == "val"])]
    return [{"seed": run_seed, "fold": fold, "train": train, "val": val}
            for run_seed in range(seeds) for fold, (train, val) in enumerate(partitions)]


def check_bags(folder: Path, slides: Sequence[str]) -> None:
    """Before any training: every slide has a bag of finite features with patches, and all bags
    were made alike (one feature width and one :func:`mil.compute_feats.bag_encoding`). The
    test slides' features are read here only to check that they are finite (a NaN would
    surface as a failed AUC after all the training); they are otherwise unused until the end."""
    missing = [s for s in slides if not (folder / f"{s}.h5").is_file()]
    if missing:
        raise DataError(f"{len(missing)} slide(s) have no features in {folder}, e.g. {missing[0]}.h5: "
                        "run mil.compute_feats, or drop them from the labels")
    first: tuple[str, tuple] | None = None
    for slide in slides:
        path = folder / f"{slide}.h5"
        try:
            with h5py.File(path, "r") as handle:
                shape = handle["features"].shape
                made = (shape[1:], *bag_encoding(handle))
                finite = bool(np.isfinite(handle["features"][:]).all())
        except (OSError, KeyError) as error:
            raise DataError(f"{path} is not a feature bag ({error}): run mil.compute_feats again for {slide}") from None
        if shape[0] == 0:
            raise DataError(f"{path} holds no patches: encode {slide} again (delete the bag and run "
                            "mil.compute_feats), or drop it from the labels")
        if not finite:
            raise DataError(f"{path} holds NaN or infinite features: encode {slide} again (delete the bag and run "
                            "mil.compute_feats; a bag that is there is skipped)")
        if first is None:
            first = (slide, made)
        elif made != first[1]:
            raise DataError(f"{folder}: the bags of {first[0]} and {slide} were made differently (feature shape, "
                            f"{', '.join(ENCODING_ATTRIBUTES)}: {first[1]} and {made}); encode every slide alike")


def seen_in_pretraining(folder: Path, test_slides: Sequence[str]) -> SeenInPretraining:
    """The test slides that the encoder of the bags saw in pretraining, from the ledger of the
    checkpoint the bags name (mil.compute_feats records its path and SHA-256), when that file
    is here and is still the one that encoded them; otherwise unknown, saying why."""
    with h5py.File(folder / f"{test_slides[0]}.h5", "r") as handle:  # check_bags: every bag made alike
        named, digest = handle.attrs.get("checkpoint"), handle.attrs.get("checkpoint_sha256")
    total = len(test_slides)
    if named is None:
        return SeenInPretraining(None, total, unknown="the bags name no checkpoint: not made by mil.compute_feats")
    if not Path(named).is_file():
        return SeenInPretraining(named, total, unknown=f"the bags' checkpoint {named} is not found")
    if file_digest(Path(named)) != digest:
        return SeenInPretraining(named, total, unknown=f"{named} has changed since it encoded the bags")
    return SeenInPretraining.count(named, pretraining_slides(load_checkpoint(named)), test_slides)


def load_bag(folder: Path, slide: str, label: str, device: torch.device) -> Bag:
    with h5py.File(folder / f"{slide}.h5", "r") as handle:
        features = torch.from_numpy(handle["features"][:]).float().to(device)
        coords = handle["coords"][:] if "coords" in handle else None
    return Bag(slide, label, features, coords)


class Targets:
    """Class names to targets: [negative, positive] for two sigmoids, [positive] for one."""

    def __init__(self, classes: Sequence[str], positive: str, num_classes: int) -> None:
        self.positive = positive
        self.negative = next(c for c in classes if c != positive)
        self.names = [self.negative, self.positive] if num_classes == 2 else [positive]

    def __call__(self, label: str) -> torch.Tensor:
        return torch.tensor([float(label == name) for name in self.names])


def bag_loss(model: torch.nn.Module, bag: Bag, target: torch.Tensor) -> torch.Tensor:
    """DSMIL's loss: 0.5 BCE on the bag logits + 0.5 BCE on the max instance logits; a pooling
    baseline has one output, its bag logits, and BCE on them alone."""
    instance_logits, bag_logits, _ = model(bag.features)
    loss = F.binary_cross_entropy_with_logits(bag_logits, target)
    if not model.dual_stream:
        return loss
    return 0.5 * loss + 0.5 * F.binary_cross_entropy_with_logits(instance_logits.max(0).values, target)


@torch.no_grad()
def score(model: torch.nn.Module, bag: Bag, average: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class probabilities of a bag, and its patches' attention and instance probabilities."""
    instance_logits, bag_logits, attention = model(bag.features)
    probabilities = torch.sigmoid(bag_logits)
    if average and model.dual_stream:
        probabilities = (probabilities + torch.sigmoid(instance_logits.max(0).values)) / 2
    return probabilities.cpu().numpy(), attention.cpu().numpy(), torch.sigmoid(instance_logits).cpu().numpy()


def aucs(targets: np.ndarray, scores: np.ndarray) -> list[float]:
    return [float(roc_auc_score(targets[:, c], scores[:, c])) for c in range(targets.shape[1])]


def youden_thresholds(targets: np.ndarray, scores: np.ndarray) -> list[float]:
    """Per class, the threshold maximising tpr - fpr (Youden's J), on validation scores."""
    thresholds = []
    for c in range(targets.shape[1]):
        fpr, tpr, candidates = roc_curve(targets[:, c], scores[:, c])
        thresholds.append(float(min(candidates[np.argmax(tpr - fpr)], 1.0)))
    return thresholds


def train_run(train_bags: list[Bag], val_bags: list[Bag], targets: Targets, feature_dim: int,
              args: argparse.Namespace, seed: int, device: torch.device) -> dict:
    """Train one model; keep the epoch with the best mean validation AUC and its thresholds."""
    torch.manual_seed(seed)
    model = AGGREGATORS[args.aggregator](feature_dim, len(targets.names)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=args.min_lr)
    order = torch.Generator().manual_seed(seed)
    val_targets = np.stack([targets(b.label).numpy() for b in val_bags])
    best = {"val_auc": -1.0, "val_loss": math.inf}
    since_best = 0
    for epoch in tqdm(range(args.epochs), desc=f"seed {seed}", unit="epoch", leave=False):
        model.train()
        for index in torch.randperm(len(train_bags), generator=order).tolist():
            bag = train_bags[index]
            loss = bag_loss(model, bag, targets(bag.label).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        model.eval()
        val_scores = np.stack([score(model, bag, args.average)[0] for bag in val_bags])
        with torch.no_grad():
            val_loss = float(np.mean([bag_loss(model, bag, targets(bag.label).to(device)).item() for bag in val_bags]))
        val_auc = float(np.mean(aucs(val_targets, val_scores)))
        # The best validation AUC; among equal AUCs (it saturates on easy data) the lower validation loss.
        if (val_auc, -val_loss) > (best["val_auc"], -best["val_loss"]):
            best = {"val_auc": val_auc, "val_loss": val_loss, "epoch": epoch + 1,
                    "thresholds": youden_thresholds(val_targets, val_scores),
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            since_best = 0
        else:
            since_best += 1
            if args.patience and since_best >= args.patience:
                break
    model.load_state_dict(best.pop("state"))
    return {"model": model.eval(), **best}


def test_run(model: torch.nn.Module, test_bags: list[Bag], targets: Targets, thresholds: list[float],
             average: bool) -> dict:
    """Score the test slides with the validation-chosen thresholds (the only use of test)."""
    scored = [score(model, bag, average) for bag in test_bags]
    test_scores = np.stack([s[0] for s in scored])
    test_targets = np.stack([targets(b.label).numpy() for b in test_bags])
    predicted = test_scores >= np.asarray(thresholds)
    positive_column = targets.names.index(targets.positive)
    return {
        "auc": dict(zip(targets.names, aucs(test_targets, test_scores))),
        # The reference's accuracy: a slide counts as right only if every thresholded output is.
        "accuracy": float((predicted == test_targets.astype(bool)).all(1).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(test_targets[:, positive_column],
                                                           predicted[:, positive_column])),
        "scores": test_scores, "targets": test_targets, "predicted": predicted,
        "attention": [s[1] for s in scored], "instance_probabilities": [s[2] for s in scored],
    }


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


@dataclass
class Protocol:
    """The slides, their labels and split, and what the outputs are."""

    labels: dict[str, str]
    split: dict[str, str]
    targets: Targets

    def slides(self, test: bool) -> list[str]:
        """The test slides, or all the others (train and val), sorted."""
        return sorted(s for s, where in self.split.items() if (where == "test") == test)


def check_options(args: argparse.Namespace) -> None:
    """What the parser cannot check by itself: the number of folds, and where the report goes."""
    if args.folds < 0 or args.folds == 1:
        raise ConfigError(f"--folds {args.folds}: use 0 (the split's val) or K >= 2 folds")
    check_output_folder(args.out, "--out")


def read_protocol(args: argparse.Namespace) -> Protocol:
    """Labels (two classes, one of them positive), the split (given, or made by seeded
    stratified sampling) and its checks."""
    labels = read_table(args.labels, ("slide", "label"))
    classes = sorted(set(labels.values()))
    if len(classes) != 2:
        raise DataError(f"{args.labels}: slide classification here is binary, found classes {', '.join(classes)}")
    positive = positive_class(classes, args.positive)
    if positive is None:
        raise ConfigError(f"name the positive class with --positive, one of {', '.join(classes)}")
    split = read_table(args.split, ("slide", "split")) if args.split else \
        make_split(labels, args.test_fraction, args.val_fraction, args.split_seed)
    unsplit = sorted(set(labels) - set(split))
    if unsplit:
        raise DataError(f"{len(unsplit)} labelled slide(s) are in no split, e.g. {unsplit[0]}: "
                        f"add them to {args.split}")
    check_split(split, labels, args.folds)
    return Protocol(labels, split, Targets(classes, positive, args.num_classes))


def train_runs(protocol: Protocol, folder: Path, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every (seed, fold) run trained on the non-test slides, best epoch chosen on validation."""
    bags = {s: load_bag(folder, s, protocol.labels[s], device) for s in protocol.slides(test=False)}
    feature_dim = next(iter(bags.values())).features.shape[1]
    trained = []
    for plan in tqdm(runs(protocol.split, protocol.labels, args.folds, args.seeds, args.split_seed),
                     desc="runs", unit="run"):
        result = train_run([bags[s] for s in plan["train"]], [bags[s] for s in plan["val"]], protocol.targets,
                           feature_dim, args, plan["seed"], device)
        trained.append({**plan, **result})
    return trained


def report_row(run: dict, result: dict, targets: Targets) -> dict:
    """One run's line of the report: its split sizes, the validation choices, its test scores."""
    return {"seed": run["seed"], "fold": run["fold"], "train_slides": len(run["train"]),
            "val_slides": len(run["val"]), "best_epoch": run["epoch"], "val_auc": run["val_auc"],
            "val_loss": run["val_loss"], "thresholds": dict(zip(targets.names, run["thresholds"])),
            "test_accuracy": result["accuracy"], "test_balanced_accuracy": result["balanced_accuracy"],
            **{f"test_auc_{name}": auc for name, auc in result["auc"].items()}}


def evaluate(args: argparse.Namespace) -> dict:
    """Train every run, then score the test slides once per run; write and return the report."""
    check_options(args)
    protocol = read_protocol(args)
    folder = Path(args.feats)
    check_bags(folder, sorted(protocol.split))
    seen = seen_in_pretraining(folder, protocol.slides(test=True))
    print(seen.line())
    if args.refuse_seen:
        seen.refuse()
    device = resolve_device(args.device)
    trained = train_runs(protocol, folder, args, device)
    # Only now are the test slides loaded, and each trained model scores them once.
    test_bags = [load_bag(folder, s, protocol.labels[s], device) for s in protocol.slides(test=True)]
    targets = protocol.targets
    tested = [test_run(run["model"], test_bags, targets, run["thresholds"], args.average) for run in trained]
    rows = [report_row(run, result, targets) for run, result in zip(trained, tested)]
    metric_names = ["test_accuracy", "test_balanced_accuracy", *[f"test_auc_{n}" for n in targets.names]]
    report = {
        "settings": dict(vars(args)), "classes": targets.names, "positive": targets.positive,
        "slides": {name: sum(1 for w in protocol.split.values() if w == name) for name in SPLITS},
        "runs": rows, "summary": {m: summarise([r[m] for r in rows]) for m in metric_names},
        "test_slides_seen_in_pretraining": seen.as_json(),
    }
    out = make_folder(Path(args.out), "--out")
    write_predictions(out / "predictions.csv", trained, tested, test_bags, targets)
    write_attention(out / "attention", trained, tested, test_bags, targets)
    plot_roc(out / "roc.png", trained, tested, targets)
    write_report(out, report)
    return report


def write_predictions(path: Path, trained: list[dict], tested: list[dict], test_bags: list[Bag],
                      targets: Targets) -> None:
    """Scores and thresholded decisions of every test slide in every run."""
    write_csv(path,
              ["seed", "fold", "slide", "label", *[f"score_{n}" for n in targets.names],
               *[f"predicted_{n}" for n in targets.names]],
              [[run["seed"], run["fold"], bag.slide, bag.label, *np.round(scores, 6), *predicted.astype(int)]
               for run, result in zip(trained, tested)
               for bag, scores, predicted in zip(test_bags, result["scores"], result["predicted"])])


def write_attention(folder: Path, trained: list[dict], tested: list[dict], test_bags: list[Bag],
                    targets: Targets) -> None:
    """``seed<S>_fold<F>.h5`` per run: per test slide, every patch's attention and instance
    probabilities, with its coordinates when known (for heatmaps)."""
    folder.mkdir(exist_ok=True)
    for run, result in zip(trained, tested):
        with h5py.File(folder / f"seed{run['seed']}_fold{run['fold']}.h5", "w") as handle:
            handle.attrs["classes"] = targets.names
            for bag, attention, instances in zip(test_bags, result["attention"], result["instance_probabilities"]):
                group = handle.create_group(bag.slide)
                group.attrs["label"] = bag.label
                group["attention"] = attention
                group["instance_probabilities"] = instances
                if bag.coords is not None:
                    group["coords"] = bag.coords


def plot_roc(path: Path, trained: list[dict], tested: list[dict], targets: Targets) -> None:
    """The test ROC curve of every output in every run."""
    figure, axes = plt.subplots(figsize=(5, 5))
    for run, result in zip(trained, tested):
        for c, name in enumerate(targets.names):
            fpr, tpr, _ = roc_curve(result["targets"][:, c], result["scores"][:, c])
            axes.plot(fpr, tpr, alpha=0.7,
                      label=f"{name} seed {run['seed']} fold {run['fold']} (AUC {result['auc'][name]:.3f})")
    axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("test ROC")
    axes.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out: Path, report: dict) -> None:
    """``report.json`` and ``report.md``: the summary over runs, then one row per run."""
    summary = report["summary"]
    lines = [
        f"# Slide classification ({report['settings']['aggregator']})", "",
        f"- slides: {report['slides']}; outputs: {', '.join(report['classes'])}; positive: {report['positive']}",
        f"- {SEEN_LABEL}: {report['test_slides_seen_in_pretraining']['text']}",
        "- best epoch and thresholds (Youden J) chosen on validation; test scored once per run", "",
        "| metric | mean | std |", "|---|---|---|",
        *[f"| {m} | {v['mean']:.4f} | {v['std']:.4f} |" for m, v in summary.items()], "",
        "| seed | fold | best epoch | val AUC | thresholds | " + " | ".join(summary) + " |",
        "|---|---|---|---|---|" + "---|" * len(summary),
    ]
    for row in report["runs"]:
        thresholds = ", ".join(f"{k} {v:.3f}" for k, v in row["thresholds"].items())
        lines.append(f"| {row['seed']} | {row['fold']} | {row['best_epoch']} | {row['val_auc']:.4f} | {thresholds} | "
                     + " | ".join(f"{row[m]:.4f}" for m in summary) + " |")
    save_report(out, report, lines)


def main(argv: Sequence[str] | None = None) -> int:
    return report_command_line(evaluate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
