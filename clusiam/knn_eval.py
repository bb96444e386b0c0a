"""The paper's patch-level evaluation as a report: top-1 KNN of test patches against
training patches on frozen features, scored by F1, and a linear probe on the same features
(:mod:`clusiam.linear_probe`), for one or many checkpoints and two baselines (a randomly
initialised encoder of the same architecture, and raw pixels), with a UMAP map of each
encoder's test features (:mod:`clusiam.embedding`).

    python evaluate_knn.py --checkpoint run/a.pth [run/b.pth ...] --train TRAIN --test TEST --out reports/knn

TRAIN and TEST are folders laid out ``root/<class>/<slide>/<patch>``, CSV files with
columns path, label, slide, or CSV files naming patches by slide and corner (slide, x, y,
label, as a tiling job's ``patch_labels.csv``), read straight from the slides of the job
the table sits in, of ``--job JOB`` or of ``--coords DIR --slides DIR``.

Each checkpoint's leakage ledger (the slides it was pretrained on) gives the number of test
slides its encoder saw in pretraining, in every report; ``--refuse_seen`` makes any an error.
"""
from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightly.utils.dist import print_rank_zero
from torch import nn

from clusiam.checkpoint import load_pretrained
from clusiam.distributed import DEVICE_HELP, add_dist_timeout, is_main, processes
from clusiam.embedding import MAX_POINTS, MIN_POINTS, SEED, Panel, embed, plot_panels
from clusiam.errors import CommandParser, ConfigError, DataError, InRange, counted, report_command_line
from clusiam.features import (
    FEATURE_TYPES,
    PixelFeatures,
    assign_clusters,
    cached_encode,
    cluster_head,
    feature_extractor,
)
from clusiam.files import check_output_folder, file_digest, make_folder
from clusiam.initial_weights import read_initial_weights, start_from
from clusiam.knn import BACKENDS, FAISS_GPU_MAX_K, choose_backend, knn_predictions
from clusiam.ledger import SEEN_LABEL, SeenInPretraining, pretraining_slides
from clusiam.linear_probe import SOLVERS, train_linear_probe
from clusiam.metrics import (
    absent_class_warnings,
    classification_metrics,
    plot_confusion_matrix,
    positive_class,
    save_report,
    write_per_slide_accuracy,
)
from clusiam.models import PretrainModel
from clusiam.slide_source import add_slide_options, slide_pairs
from clusiam.sources import seeded_sample
from clusiam.splits import LabelledPatches, read_labelled_patches, split_overlap

PIXEL_BASELINE_SIZE = 16  # raw-pixel baseline: 16 x 16 x 3 = 768 values


@dataclass
class Encoder:
    """A feature extractor and everything a report row needs to say about it."""

    name: str
    feature: str
    module: nn.Module
    mean: list[float]
    std: list[float]
    identity: str  # what makes its features unique, for the cache
    checkpoint: str | None = None  # None: a baseline
    sha256: str | None = None  # the checkpoint file's (an export's model card finds its rows by it)
    pretrained_on: list[str] | None = None  # the checkpoint's ledger; None when it has none
    clusters: nn.Module | None = None  # features -> cluster logits, for a clustered checkpoint
    epochs: int | None = None  # the checkpoint's pretraining epochs
    random_init: bool = False  # the random-init baseline, which the report compares checkpoints with


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="evaluate_knn.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or more clusiam checkpoints")
    parser.add_argument("--train", required=True,
                        help="training patches: root/<class>/<slide>/<patch>, a CSV (path, label, slide) or a CSV "
                             "(slide, x, y, label) read from slides")
    parser.add_argument("--test", required=True, help="test patches, as --train")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--positive", default=None, help="positive class for binary F1 (default: tumor when present)")
    parser.add_argument("--k", type=int, nargs="+", default=[1],
                        help="neighbours; 1 is the paper's score (e.g. --k 1 5 20 200)")
    parser.add_argument("--feature", default="backbone", choices=FEATURE_TYPES,
                        help="backbone output (the paper's) or projector output")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help=f"the exact neighbour search; auto: faiss-gpu (up to k = {FAISS_GPU_MAX_K}), else "
                             "torch-cuda, else faiss-cpu, the first usable here")
    parser.add_argument("--device", default="auto", help=f"where features are computed: {DEVICE_HELP}")
    parser.add_argument("--batch_size", type=int, default=256, action=InRange, at_least=1)
    parser.add_argument("--num_workers", type=int, default=4, action=InRange, at_least=0,
                        help="data loading processes (0 = in the main process)")
    parser.add_argument("--resize", type=int, default=None, action=InRange, at_least=1,
                        help="bring every patch to N x N pixels before encoding (patches from slides are read so; "
                             "default: as they are)")
    parser.add_argument("--cache_dir", default=None, help="feature cache (default: OUT/cache)")
    parser.add_argument("--allow_overlap", action="store_true",
                        help="evaluate even when train and test share slides or files")
    parser.add_argument("--no_baselines", dest="baselines", action="store_false",
                        help="skip the random-encoder and raw-pixel rows")
    parser.add_argument("--no_linear", dest="linear", action="store_false",
                        help="skip the linear-probe rows")
    parser.add_argument("--linear_solver", default="auto", choices=SOLVERS,
                        help="the linear probe's solver: scikit-learn, or torch (L-BFGS over row chunks, on the "
                             "features' device); auto: torch on a GPU for large sets, else scikit-learn")
    parser.add_argument("--no_embedding", dest="embedding", action="store_false",
                        help="skip the UMAP maps of the test features (embedding.png)")
    parser.add_argument("--refuse_seen", action="store_true",
                        help="stop when a checkpoint saw any test slide in pretraining (or its ledger is missing)")
    add_slide_options(parser, "for --train / --test tables of slide, x, y, label; a table in a tiling job's "
                              "folder is read from that job without them")
    add_dist_timeout(parser, "rank 0 searching and writing the report while the others wait")
    return parser


def row_name(path: str) -> str:
    """A file-system-safe name for a checkpoint path, e.g. runs/a/last.pth -> runs_a_last."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(Path(path).with_suffix(""))).strip("_")


def checkpoint_encoders(paths: Sequence[str], feature: str) -> tuple[list[Encoder], list[dict]]:
    """One encoder per checkpoint, and the checkpoints (the baselines copy the first's setup)."""
    encoders, states = [], []
    for path in paths:
        model, state = load_pretrained(path)
        states.append(state)
        digest = file_digest(Path(path))
        encoders.append(Encoder(
            name=row_name(path), feature=feature, module=feature_extractor(model, feature),
            mean=state["normalization"]["mean"], std=state["normalization"]["std"],
            identity=f"checkpoint {digest} {feature}", checkpoint=str(path), sha256=digest,
            pretrained_on=pretraining_slides(state), clusters=cluster_head(model, feature), epochs=state["epoch"],
        ))
    return encoders, states


def baseline_encoders(reference: dict) -> list[Encoder]:
    """A randomly initialised encoder of the reference checkpoint's architecture (seed 0)
    and downsampled raw pixels, both with its normalisation."""
    config, normalization = reference["config"], reference["normalization"]
    torch.manual_seed(0)
    random_model = PretrainModel(config["model_type"], config["backbone"], config["feat_size"], config["num_clusters"])
    return [
        Encoder(f"random_{config['backbone']}", "backbone", random_model.backbone,
                normalization["mean"], normalization["std"],
                f"random {config['model_type']} {config['backbone']} {config['feat_size']} seed0", random_init=True),
        Encoder("raw_pixels", f"pixels {PIXEL_BASELINE_SIZE}x{PIXEL_BASELINE_SIZE}",
                PixelFeatures(PIXEL_BASELINE_SIZE), normalization["mean"], normalization["std"],
                f"pixels {PIXEL_BASELINE_SIZE}"),
    ]


def initial_weight_encoders(states: Sequence[dict], warnings: list[str]) -> list[Encoder]:
    """A baseline row per distinct --init the checkpoints started from: those weights before any
    pretraining, with the checkpoint's normalisation, so that a report shows what pretraining added.
    Weights that moved or changed since are left out, and the report says so in ``warnings``."""
    encoders, done = [], set()
    for state in states:
        init, config = state.get("init"), state["config"]
        if init is None or init["sha256"] in done:
            continue
        done.add(init["sha256"])
        try:
            initial = read_initial_weights(init["source"], config["backbone"])
        except ConfigError as error:
            warnings.append(f"no row for the initial weights {init['source']}: {error}")
            continue
        if initial.sha256 != init["sha256"]:
            warnings.append(f"no row for the initial weights {init['source']}: the file changed since pretraining "
                            f"(SHA-256 {initial.sha256[:12]}..., pretrained from {init['sha256'][:12]}...)")
            continue
        model = PretrainModel(config["model_type"], config["backbone"], config["feat_size"], config["num_clusters"])
        start_from([model.backbone], initial)
        mean, std = state["normalization"]["mean"], state["normalization"]["std"]
        encoders.append(Encoder(f"init_{row_name(Path(init['source']).name)}", "backbone", model.backbone, mean, std,
                                f"init {init['sha256']} {config['backbone']}"))
    return encoders


def split_summary(patches: LabelledPatches) -> dict:
    return {"patches": len(patches), "slides": len(set(patches.slides)),
            "classes": {c: patches.labels.count(c) for c in sorted(set(patches.labels))}}


@dataclass
class Splits:
    """The labelled patches of one evaluation, checked: what is searched and what is scored."""

    train: LabelledPatches
    test: LabelledPatches
    classes: list[str]
    positive: str | None
    warnings: list[str]  # what the report must say: an overlap the user allowed, classes a split lacks

    def counts(self) -> dict[str, int]:
        return {f"{name}_{what}": split_summary(patches)[what]
                for name, patches in (("train", self.train), ("test", self.test)) for what in ("patches", "slides")}


def read_splits(args: argparse.Namespace) -> Splits:
    """``--train`` and ``--test``, refused when they overlap (unless ``--allow_overlap``) or
    when a ``--k`` cannot be searched; a split without some of the classes is evaluated, and
    the report says what that leaves undefined."""
    pairs = slide_pairs(args)
    train, test = (read_labelled_patches(split, pairs, args.resize) for split in (args.train, args.test))
    problems = split_overlap(train, test)
    if problems and not args.allow_overlap:
        raise DataError("train and test overlap: " + "; ".join(problems) +
                        ". Split by slide, or pass --allow_overlap to evaluate anyway (the report will say so)")
    classes = sorted(set(train.labels) | set(test.labels))
    if min(args.k) < 1 or max(args.k) > len(train):
        raise ConfigError(f"--k {' '.join(map(str, args.k))}: each k must lie between 1 and the "
                          f"{len(train)} training patches")
    positive = positive_class(classes, args.positive)
    warnings = [f"train/test overlap allowed by --allow_overlap: {p}" for p in problems]
    warnings += training_set_warnings(train.labels, classes)
    warnings += absent_class_warnings(test.labels, classes, positive)
    return Splits(train, test, classes, positive, warnings)


def training_set_warnings(labels: Sequence[str], classes: Sequence[str]) -> list[str]:
    """The classes the KNN can never predict, because no training patch has them."""
    in_training = sorted(set(labels))
    absent = [c for c in classes if c not in in_training]
    if not absent:
        return []
    if len(in_training) == 1:
        return [f"the training set holds only class {in_training[0]}: every test patch is predicted "
                f"{in_training[0]}; add patches of {', '.join(absent)} to the training set"]
    return [f"{', '.join(absent)} {'does' if len(absent) == 1 else 'do'} not occur in the training set: the KNN "
            f"never predicts {'it' if len(absent) == 1 else 'them'}; add such patches to the training set"]


def all_encoders(args: argparse.Namespace, warnings: list[str]) -> list[Encoder]:
    """One encoder per checkpoint and, unless ``--no_baselines``, the baselines (random init,
    raw pixels, the --init weights the checkpoints started from); each needs a report name
    (and folder) of its own."""
    encoders, states = checkpoint_encoders(args.checkpoint, args.feature)
    if args.baselines:
        encoders += baseline_encoders(states[0]) + initial_weight_encoders(states, warnings)
    names = [encoder.name for encoder in encoders]
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ConfigError(f"two encoders would share the report name {repeated[0]} (and its folder): pass each "
                          "checkpoint once, under paths that differ in more than punctuation")
    return encoders


def seen_in_pretraining(encoders: Sequence[Encoder], test_slides: Sequence[str],
                        refuse: bool) -> dict[str, SeenInPretraining]:
    """Per encoder, the test slides it saw in pretraining, printed. With ``--refuse_seen`` a
    checkpoint that saw one, or whose ledger is missing, stops the evaluation here, before
    any encoding."""
    seen = {e.name: SeenInPretraining.count(e.checkpoint, e.pretrained_on, test_slides) for e in encoders}
    for name, count in seen.items():
        print_rank_zero(f"{name}: {count.line()}")
    if refuse:
        for count in seen.values():
            count.refuse()
    return seen


def knn_rows(encoder: Encoder, features: dict[str, np.ndarray], splits: Splits, ks: Sequence[int], backend: str,
             out: Path) -> list[dict]:
    """Search once for the largest k and score every k; at the tables' k (the paper's k = 1
    when asked for) also write the encoder's confusion matrix and per-slide accuracy."""
    started = time.perf_counter()
    predictions = knn_predictions(features["train"], splits.train.labels, features["test"], ks, splits.classes, backend)
    seconds = round(time.perf_counter() - started, 3)
    rows = []
    for k, predicted in predictions.items():
        rows.append(score_row(encoder, splits, predicted, {"classifier": "knn", "k": k}, backend, seconds))
        if k == tables_k(ks):
            write_tables(out / encoder.name, "", predicted, rows[-1], splits, f"k={k}")
    return rows


def linear_row(encoder: Encoder, features: dict[str, np.ndarray], splits: Splits, solver: str,
               device: torch.device, out: Path) -> dict:
    """The linear probe: C chosen on validation slides of the training split, refitted on all
    of it, the test split scored once; its confusion matrix and per-slide accuracy beside the KNN's."""
    started = time.perf_counter()
    probe = train_linear_probe(features["train"], splits.train.labels, splits.train.slides, solver, device)
    predicted = probe.predict(features["test"])
    seconds = round(time.perf_counter() - started, 3)
    chosen = {"classifier": "linear", "k": None, "C": probe.c, "validation_macro_f1": probe.validation_macro_f1}
    row = score_row(encoder, splits, predicted, chosen, f"{probe.solver}-{device.type}", seconds)
    row["warnings"] = probe.warnings + row["warnings"]
    write_tables(out / encoder.name, "linear_", predicted, row, splits, f"linear, C={probe.c:g}")
    return row


def score_row(encoder: Encoder, splits: Splits, predicted: Sequence[str], classifier: dict, backend: str,
              seconds: float) -> dict:
    """One report row: the encoder, the classifier, its scores on the test split."""
    metrics = classification_metrics(splits.test.labels, predicted, splits.classes, splits.positive)
    return {"encoder": encoder.name, "checkpoint": encoder.checkpoint, "checkpoint_sha256": encoder.sha256,
            "feature": encoder.feature, **classifier,
            **metrics, **splits.counts(), "backend": backend, "classifier_seconds": seconds}


def write_tables(folder: Path, prefix: str, predicted: Sequence[str], row: dict, splits: Splits, what: str) -> None:
    """A classifier's confusion matrix and per-slide accuracy in the encoder's folder."""
    folder.mkdir(exist_ok=True)
    plot_confusion_matrix(row["confusion_matrix"], splits.classes, f"{row['encoder']} ({row['feature']}, {what})",
                          folder / f"{prefix}confusion_matrix.png")
    write_per_slide_accuracy(folder / f"{prefix}per_slide.csv", splits.test.slides, splits.test.labels, predicted,
                             splits.positive)


def below_random_init(encoders: Sequence[Encoder], rows: Sequence[dict]) -> list[str]:
    """A note for each checkpoint row that scores below the random-init encoder's row of the
    same classifier, saying when that is expected and how to tell a fault from it."""
    random_name = random_init_name(encoders)
    random_rows = {(row["classifier"], row["k"]): row for row in rows if row["encoder"] == random_name}
    epochs = {encoder.name: encoder.epochs for encoder in encoders}
    notes = []
    for row in rows:
        baseline = random_rows.get((row["classifier"], row["k"]))
        if row["checkpoint"] is None or baseline is None or None in (row["f1"], baseline["f1"]):
            continue
        if row["f1"] < baseline["f1"]:
            notes.append(
                f"{row['encoder']}, {classifier_name(row)}: F1 {row['f1']:.4f} is below the random-init encoder's "
                f"{baseline['f1']:.4f}. A random ResNet is a strong k-NN baseline on small sets of texture-like "
                f"patches, and an encoder after {counted(epochs[row['encoder']], 'epoch')} of pretraining often stays "
                "below it (the paper trained 50 epochs on about 2.6 M patches). A fault looks different: collapse "
                "warnings in the run, or probe scores (pretrain.py --probe) that fall as training goes on")
    return notes


def random_init_name(encoders: Sequence[Encoder]) -> str | None:
    """The random-init baseline's name (None with --no_baselines)."""
    return next((encoder.name for encoder in encoders if encoder.random_init), None)


def classifier_name(row: dict) -> str:
    """How a report names a row's classifier: ``knn, k = 1`` or ``linear, C = 0.01``."""
    return f"knn, k = {row['k']}" if row["classifier"] == "knn" else f"linear, C = {row['C']:g}"


def embedding_panels(encoder: Encoder, test: np.ndarray, labels: Sequence[str]) -> list[Panel]:
    """An encoder's UMAP of the (sampled) test features, by label and, when it has clusters, by cluster."""
    points = embed(test)
    panels = [Panel(f"{encoder.name}: label", points, labels, legend=True)]
    if encoder.clusters is not None:
        clusters = assign_clusters(encoder.clusters, test)
        panels.append(Panel(f"{encoder.name}: cluster ({len(set(clusters.tolist()))} used)", points, clusters.tolist(),
                            legend=False))
    return panels


def draw_embeddings(out: Path, encoders: Sequence[Encoder], panels: dict[str, list[Panel]], shown: int,
                    total: int) -> None:
    """``embedding.png`` in each encoder's folder: its panels, and the random-init encoder's
    (when the baselines ran) beside them."""
    random_name = random_init_name(encoders)
    for encoder in encoders:
        beside = panels[random_name][:1] if random_name and encoder.name != random_name else []
        title = f"UMAP of {shown} of {total} test patches ({encoder.feature} features)"
        plot_panels([*panels[encoder.name], *beside], title, out / encoder.name / "embedding.png")


def tables_k(ks: Sequence[int]) -> int:
    """The k of the confusion matrix and per-slide table: the paper's k = 1, else the first."""
    return 1 if 1 in ks else ks[0]


def evaluate(args: argparse.Namespace) -> dict | None:
    """Run the evaluation and write the report folder; return the report. Under torchrun
    every process encodes its share of the patches and rank 0 alone searches and reports
    (the others return None)."""
    check_output_folder(args.out, "--out")  # before any work: a report that cannot be written is refused now
    if args.cache_dir:
        check_output_folder(args.cache_dir, "--cache_dir")
    with processes(args.device, args.dist_timeout) as device:
        return evaluate_on(device, args)


def evaluate_on(device: torch.device, args: argparse.Namespace) -> dict | None:
    out = Path(args.out)
    splits = read_splits(args)
    backend = choose_backend(args.backend, max(args.k))
    print_rank_zero(f"KNN on {backend}; features on {device}; {len(splits.train)} train / "
                    f"{len(splits.test)} test patches; classes {splits.classes}, positive {splits.positive}")
    encoders = all_encoders(args, splits.warnings)
    seen = seen_in_pretraining(encoders, splits.test.slides, args.refuse_seen)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    options = {"batch_size": args.batch_size, "num_workers": args.num_workers, "resize": args.resize}
    if is_main():
        make_folder(out, "--out")
    shown = seeded_sample(len(splits.test), MAX_POINTS, SEED)  # the patches every encoder's map shows
    draw = args.embedding and len(shown) >= MIN_POINTS
    rows, panels = [], {}
    for encoder in encoders:
        started = time.perf_counter()
        features, cached = {}, {}
        for name, patches in (("train", splits.train), ("test", splits.test)):
            features[name], cached[name] = cached_encode(
                cache_dir, encoder.identity, encoder.module, patches.source, encoder.mean, encoder.std, device,
                desc=f"{encoder.name} {name}", **options)
        encoding = {"features_cached": cached["train"] and cached["test"],
                    "encode_seconds": round(time.perf_counter() - started, 3)}
        ledger = {"test_slides_seen_in_pretraining": seen[encoder.name].as_json()}
        if not is_main():
            continue
        encoder_rows = knn_rows(encoder, features, splits, args.k, backend, out)
        if args.linear:
            encoder_rows.append(linear_row(encoder, features, splits, args.linear_solver, device, out))
        rows += [{**row, **encoding, **ledger} for row in encoder_rows]
        if draw:
            panels[encoder.name] = embedding_panels(encoder, features["test"][shown],
                                                    [splits.test.labels[i] for i in shown])
    if not is_main():
        return None
    if draw:
        draw_embeddings(out, encoders, panels, len(shown), len(splits.test))
    elif args.embedding:
        held = counted(len(splits.test), "patch", "patches")
        splits.warnings.append(f"no embedding map: the test split holds {held}, fewer than the {MIN_POINTS} a UMAP "
                               "needs")
    report = {
        "train": {"source": str(args.train), **split_summary(splits.train)},
        "test": {"source": str(args.test), **split_summary(splits.test)},
        "classes": splits.classes, "positive": splits.positive, "backend": backend, "device": str(device),
        "tables_k": tables_k(args.k), "rows": rows,
        "warnings": splits.warnings + [f"{row['encoder']}, {classifier_name(row)}: {note}"
                                       for row in rows for note in row["warnings"]] + below_random_init(encoders, rows),
    }
    write_report(out, report)
    return report


def write_report(out: Path, report: dict) -> None:
    """``report.json`` and ``report.md``: one row per encoder and k."""
    positive = report["positive"]
    train, test = report["train"], report["test"]
    lines = [
        "# Patch classification: KNN and linear probe",
        "",
        f"- train: `{train['source']}`: {counted(train['patches'], 'patch', 'patches')} from "
        f"{counted(train['slides'], 'slide')} {train['classes']}",
        f"- test: `{test['source']}`: {counted(test['patches'], 'patch', 'patches')} from "
        f"{counted(test['slides'], 'slide')} {test['classes']}",
        f"- positive class: {positive}; search backend: {report['backend']}; features on {report['device']}",
        f"- each encoder's folder: confusion matrix and per-slide accuracy at k = {report['tables_k']} (and "
        "`linear_*` for the linear probe: C chosen on validation slides of the training split), `embedding.png`",
        *[f"- {encoder}: {SEEN_LABEL}: {text}" for encoder, text in seen_texts(report).items()],
        "",
        f"| encoder | feature | classifier | F1 ({positive}) | macro F1 | accuracy | balanced accuracy | "
        "train / test patches (slides) | backend | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        f1 = score(row["f1"], 4)
        seconds = row["encode_seconds"] + row["classifier_seconds"]
        lines.append(f"| {row['encoder']} | {row['feature']} | {classifier_name(row)} | {f1} | {row['macro_f1']:.4f} | "
                     f"{row['accuracy']:.4f} | {row['balanced_accuracy']:.4f} | "
                     f"{row['train_patches']} ({row['train_slides']}) / "
                     f"{row['test_patches']} ({row['test_slides']}) | {row['backend']} | {seconds:.1f} |")
    lines += ["", "Per class (precision / recall / F1, support):", "",
              "| encoder | classifier | " + " | ".join(report["classes"]) + " |",
              "|---|---|" + "---|" * len(report["classes"])]
    for row in report["rows"]:
        cells = [f"{score(m['precision'], 3)} / {score(m['recall'], 3)} / {score(m['f1'], 3)} ({m['support']})"
                 for m in row["per_class"].values()]
        lines.append(f"| {row['encoder']} | {classifier_name(row)} | " + " | ".join(cells) + " |")
    if report["warnings"]:
        lines += ["", "**Warnings**", "", *[f"- {w}" for w in report["warnings"]]]
    save_report(out, report, lines)


def seen_texts(report: dict) -> dict[str, str]:
    """Each encoder's count of test slides seen in pretraining, in words (its rows share it)."""
    return {row["encoder"]: row["test_slides_seen_in_pretraining"]["text"] for row in report["rows"]}


def score(value: float | None, digits: int) -> str:
    """A score for report.md; an undefined one (None) is "-"."""
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    return report_command_line(evaluate, build_parser(), argv)
