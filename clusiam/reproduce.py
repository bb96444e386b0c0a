"""The paper's protocol in one command: pretrain CluSiam, CluBYOL, SimSiam and BYOL with one
budget and one set of seeds, score every encoder by top-1 KNN F1, the linear probe and
DSMIL, and write one table beside the numbers of Wu et al. (ICCV 2023).

    python -m clusiam.reproduce --out reports/reproduce                       # the demo set, a tiny CPU budget
    python -m clusiam.reproduce /data/camelyon16/patches --out reports/c16 \\
        --knn_train knn_train.csv --knn_test knn_test.csv --slide_labels slides.csv --split split.csv \\
        --seeds 0 1 2 -- --num_worker 16 --patch_mpp 0.5                    # the paper's budget, on a GPU

``DATA`` is a patch folder ``root/<class>/<slide>/<patch>`` (the authors' layout): every
method pretrains on all of it, ``evaluate_knn.py`` scores the ``--knn_train`` / ``--knn_test``
tables (one report for every checkpoint, with the random-init and raw-pixel baselines), and
``mil.compute_feats`` + ``mil.train`` score each checkpoint's bags of the slides in
``--slide_labels``. Without ``DATA`` the built-in demo set is written to ``OUT/demo_data``
and the budget defaults to a tiny one. Options after ``--`` go to every ``pretrain.py`` run.

Everything lands in ``OUT``: ``runs/<method>_seed<S>/`` (pretraining, resumed by a rerun),
``knn/`` (the KNN and linear report), ``feats/`` and ``mil/`` per run, and the table,
``reproduce.md`` and ``reproduce.json``, which state the budget, the data, the leakage
ledger's count and every way the setting differs from the paper's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from clusiam.config import parse_config
from clusiam.demo import prepare_demo
from clusiam.distributed import DEVICE_HELP
from clusiam.errors import CommandParser, ConfigError, InRange, counted, run_command
from clusiam.files import check_output_folder, make_folder, write_atomically
from clusiam.knn_eval import build_parser as knn_parser
from clusiam.knn_eval import evaluate as knn_evaluate
from clusiam.knn_eval import read_splits
from clusiam.models import METHODS
from clusiam.runlock import holding
from clusiam.train import train
from mil.compute_feats import build_parser as feats_parser
from mil.compute_feats import compute as compute_feats
from mil.train import build_parser as mil_parser
from mil.train import check_options as check_mil_options
from mil.train import evaluate as mil_evaluate
from mil.train import read_protocol

# Wu et al., ICCV 2023, on Camelyon16 with ResNet-18: KNN F1 from the authors' README, DSMIL
# (accuracy, AUC(Neg.), AUC(Pos.)) from the paper's table; the paper gives no DSMIL row for BYOL.
PAPER = {
    "clubyol": {"knn_f1": 0.768, "dsmil": (0.923, 0.947, 0.975)},
    "clusiam": {"knn_f1": 0.730, "dsmil": (0.907, 0.945, 0.952)},
    "simsiam": {"knn_f1": 0.511, "dsmil": (0.721, 0.656, 0.680)},
    "byol": {"knn_f1": 0.441, "dsmil": None},
}
PAPER_BUDGET = {"epochs": 50, "batch_size": 512, "image_size": 224, "num_clusters": 100}
DEMO_BUDGET = {"epochs": 2, "batch_size": 64, "image_size": 64, "num_clusters": 10}
RUN_OPTIONS = (*PAPER_BUDGET, "model_type", "seed", "save_path", "resume", "device", "num_worker")
PAPER_DATA = ("Camelyon16: pretrained on about 2.6 M patches of 224 px at 20x from the 270 training slides; DSMIL "
              "on the official split")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m clusiam.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="patch folder root/<class>/<slide>/<patch> (omit for the built-in demo set)")
    parser.add_argument("--out", required=True, help="folder for the runs, reports and the table")
    parser.add_argument("--knn_train", default=None, help="KNN training table (default: DATA/knn_train.csv)")
    parser.add_argument("--knn_test", default=None, help="KNN test table (default: DATA/knn_test.csv)")
    parser.add_argument("--slide_labels", default=None, help="slide, label CSV (default: DATA/slide_labels.csv)")
    parser.add_argument("--split", default=None, help="slide, split CSV for DSMIL (default: a seeded split)")
    parser.add_argument("--mil_patches", default=None,
                        help="patch folder of every labelled slide, for the DSMIL bags (default: DATA); DATA then "
                             "need hold only the slides to pretrain on")
    parser.add_argument("--methods", nargs="+", default=list(PAPER), choices=list(METHODS),
                        help="the methods to pretrain and compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], action=InRange, at_least=0,
                        help="pretraining seeds: every method is pretrained once per seed")
    for name, value in PAPER_BUDGET.items():
        parser.add_argument(f"--{name}", type=int, default=None, action=InRange, at_least=1,
                            help=f"pretraining budget (default: the paper's {value} with DATA, the demo's "
                                 f"{DEMO_BUDGET[name]} without)")
    parser.add_argument("--mil_epochs", type=int, default=50, action=InRange, at_least=1)
    parser.add_argument("--mil_seeds", type=int, default=3, action=InRange, at_least=1,
                        help="DSMIL runs per encoder (seeds 0 .. N-1)")
    parser.add_argument("--mil_folds", type=int, default=0, help="as mil.train --folds")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--num_workers", type=int, default=8, action=InRange, at_least=0)
    return parser


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This command's options, and the ``pretrain.py`` options after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    fixed = [option for option in extra if option.startswith("--") and option.split("=")[0][2:] in RUN_OPTIONS]
    if fixed:
        raise ConfigError(f"{fixed[0]} after --: the runs' {', '.join(RUN_OPTIONS)} are set by this command; pass the "
                          "budget options before --")
    budget = PAPER_BUDGET if args.data else DEMO_BUDGET
    for name, value in budget.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args, extra


def inputs(args: argparse.Namespace) -> dict[str, Path | None]:
    """The patch folder and tables (the demo's, written now, without DATA); each must exist."""
    data = Path(args.data) if args.data else prepare_demo(Path(args.out) / "demo_data") / "synthetic"
    paths = {"data": data, "mil_patches": args.mil_patches or data,
             "knn_train": args.knn_train or data / "knn_train.csv", "knn_test": args.knn_test or data / "knn_test.csv",
             "slide_labels": args.slide_labels or data / "slide_labels.csv", "split": args.split}
    for name, path in paths.items():
        if path is not None and not Path(path).exists():
            flag = "DATA" if name == "data" else f"--{name}"
            kind = "folder" if name in ("data", "mil_patches") else "table"
            raise ConfigError(f"{flag} {path} does not exist: pass an existing {kind}")
    return {name: None if path is None else Path(path) for name, path in paths.items()}


def pretrain(method: str, seed: int, data: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> Path:
    """One method and seed, with the method's own recipe (:data:`clusiam.models.METHODS`) and the
    common budget; a rerun resumes or finds it finished."""
    budget = [f"--{name}={getattr(args, name)}" for name in PAPER_BUDGET]
    return train(parse_config([str(data), "--model_type", method, "--seed", str(seed), *budget,
                               "--save_path", str(out / "runs" / f"{method}_seed{seed}"), "--resume", "auto",
                               "--device", args.device, "--num_worker", str(args.num_workers), *extra]))


def knn_options(checkpoints: Sequence[Path], paths: dict[str, Path | None], out: Path,
                args: argparse.Namespace) -> argparse.Namespace:
    """``evaluate_knn.py``'s options: every checkpoint in one report, at the paper's k = 1."""
    return knn_parser().parse_args(
        ["--checkpoint", *map(str, checkpoints), "--train", str(paths["knn_train"]), "--test", str(paths["knn_test"]),
         "--out", str(out / "knn"), "--k", "1", "--device", args.device, "--num_workers", str(args.num_workers)])


def mil_options(name: str, paths: dict[str, Path | None], out: Path, args: argparse.Namespace) -> argparse.Namespace:
    """``mil.train``'s options for one run's bags."""
    split = ["--split", str(paths["split"])] if paths["split"] else []
    return mil_parser().parse_args(["--feats", str(out / "feats" / name), "--labels", str(paths["slide_labels"]),
                                    "--out", str(out / "mil" / name), "--epochs", str(args.mil_epochs), "--seeds",
                                    str(args.mil_seeds), "--folds", str(args.mil_folds), *split,
                                    "--device", args.device])


def check_evaluations(paths: dict[str, Path | None], out: Path, args: argparse.Namespace) -> None:
    """The KNN tables (their overlap, k = 1) and the slide labels and split, checked as the
    evaluations will check them, before any pretraining: a refusal then costs nothing."""
    read_splits(knn_options([Path("unused.pth")], paths, out, args))
    options = mil_options("check", paths, out, args)
    check_mil_options(options)
    read_protocol(options)


def slide_level(checkpoint: Path, name: str, paths: dict[str, Path | None], out: Path,
                args: argparse.Namespace) -> dict:
    """DSMIL on the checkpoint's bags of every labelled slide; the mil.train report."""
    options = mil_options(name, paths, out, args)
    compute_feats(feats_parser().parse_args(["--checkpoint", str(checkpoint), "--patches", str(paths["mil_patches"]),
                                             "--labels", str(paths["slide_labels"]), "--out", options.feats,
                                             "--num_workers", str(args.num_workers), "--device", args.device]))
    return mil_evaluate(options)


def reproduce(args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.out)
    check_output_folder(out, "--out")
    paths = inputs(args) if args.data else None  # checked before OUT exists; the demo set is written into OUT
    with holding(make_folder(out, "--out"), "--out"):
        return protocol(args, extra, paths or inputs(args))


def protocol(args: argparse.Namespace, extra: list[str], paths: dict[str, Path | None]) -> dict:
    """Every stage, then the table."""
    out = Path(args.out)
    check_evaluations(paths, out, args)
    runs = {(method, seed): pretrain(method, seed, paths["data"], out, args, extra)
            for method in args.methods for seed in args.seeds}
    knn = knn_evaluate(knn_options(list(runs.values()), paths, out, args))
    mil = {key: slide_level(path, f"{key[0]}_seed{key[1]}", paths, out, args) for key, path in runs.items()}
    table = summarise(runs, knn, mil, args)
    table.update(setting(args, paths, knn, table["methods"], extra))
    write_atomically(out / "reproduce.json", lambda temporary: temporary.write_text(json.dumps(table, indent=2)))
    text = "\n".join(markdown(table)) + "\n"
    (out / "reproduce.md").write_text(text)
    print(text)
    return table


def summarise(runs: dict[tuple[str, int], Path], knn: dict, mil: dict[tuple[str, int], dict],
              args: argparse.Namespace) -> dict:
    """Per method, the mean and spread over pretraining seeds of each score; the baselines' KNN
    and linear rows."""
    def scores(key: tuple[str, int]) -> dict[str, float | None]:
        summary, names = mil[key]["summary"], mil[key]["classes"]  # names: negative, positive
        return {**patch_scores(knn, str(runs[key])), "dsmil_accuracy": summary["test_accuracy"]["mean"],
                "dsmil_auc_negative": summary[f"test_auc_{names[0]}"]["mean"],
                "dsmil_auc_positive": summary[f"test_auc_{names[-1]}"]["mean"]}

    methods = {}
    for method in args.methods:
        per_seed = [scores((method, seed)) for seed in args.seeds]
        first = (method, args.seeds[0])
        seen = {"knn": next(row["test_slides_seen_in_pretraining"] for row in knn["rows"]
                            if row["checkpoint"] == str(runs[first])),
                "dsmil": mil[first]["test_slides_seen_in_pretraining"]}
        methods[method] = {"scores": {name: spread([s[name] for s in per_seed]) for name in per_seed[0]},
                           "test_slides_seen_in_pretraining": seen, "paper": PAPER[method]}
    baselines = dict.fromkeys(row["encoder"] for row in knn["rows"] if row["checkpoint"] is None)
    return {"methods": methods, "baselines": {name: patch_scores(knn, name) for name in baselines},
            "positive": knn["positive"]}


def patch_scores(knn: dict, encoder: str) -> dict[str, float | None]:
    """The KNN (k = 1) and linear F1 of one encoder of the KNN report, named by its checkpoint
    (a baseline by its name)."""
    rows = {row["classifier"]: row for row in knn["rows"] if encoder in (row["checkpoint"], row["encoder"])}
    return {"knn_f1": rows["knn"]["f1"], "linear_f1": rows["linear"]["f1"]}


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and population standard deviation (0 for one value); None when a value is undefined."""
    if any(value is None for value in values):
        return {"mean": None, "std": None}
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def setting(args: argparse.Namespace, paths: dict[str, Path | None], knn: dict, methods: dict,
            extra: list[str]) -> dict:
    """The budget and data of this run, and how they differ from the paper's."""
    budget = {name: getattr(args, name) for name in PAPER_BUDGET}
    differences = [f"{name} {budget[name]} (the paper's: {value})" for name, value in PAPER_BUDGET.items()
                   if budget[name] != value]
    if len(args.seeds) == 1:
        differences.append("one pretraining seed: no spread over pretraining runs")
    if args.data is None:
        differences.insert(0, "data: the built-in synthetic demo set, a check that the protocol runs end to end, "
                              "not a replication (its numbers say nothing about Camelyon16)")
    seen = [f"{method} saw {row['test_slides_seen_in_pretraining'][where]['text']} {where.upper()} test slides"
            for method, row in methods.items() for where in ("knn", "dsmil")
            if row["test_slides_seen_in_pretraining"][where]["seen"] != 0]
    if seen:
        differences.append("pretrained on test slides (unlabelled; the paper pretrained on the training slides): "
                           + ", ".join(seen))
    if extra:
        differences.append(f"pretrain.py options: {' '.join(extra)}")
    return {
        "budget": {**budget, "seeds": args.seeds, "mil_epochs": args.mil_epochs, "mil_seeds": args.mil_seeds,
                   "mil_folds": args.mil_folds},
        "tiny_budget": args.data is None,
        "data": {"patches": str(paths["data"]), "mil_patches": str(paths["mil_patches"]), "knn_train": knn["train"],
                 "knn_test": knn["test"],
                 "slide_labels": str(paths["slide_labels"]), "split": str(paths["split"] or "seeded by mil.train")},
        "paper_setting": {**PAPER_BUDGET, "data": PAPER_DATA},
        "differences": differences,
    }


def markdown(table: dict) -> list[str]:
    budget = table["budget"]
    head = ("tiny budget (the demo set), not the paper's" if table["tiny_budget"] else "budget")
    lines = [
        "# CluSiam / CluBYOL protocol, beside Wu et al. (ICCV 2023)", "",
        f"- {head}: {counted(budget['epochs'], 'epoch')}, batch {budget['batch_size']}, {budget['image_size']} px "
        f"views, K = {budget['num_clusters']}, pretraining seeds {budget['seeds']}; DSMIL "
        f"{counted(budget['mil_epochs'], 'epoch')} x {counted(budget['mil_seeds'], 'seed')}",
        f"- data: `{table['data']['patches']}`; KNN {table['data']['knn_train']['patches']} train / "
        f"{table['data']['knn_test']['patches']} test patches; DSMIL split: {table['data']['split']}",
        f"- the paper: {table['paper_setting']['epochs']} epochs, batch {table['paper_setting']['batch_size']}, "
        f"{table['paper_setting']['image_size']} px, K = {table['paper_setting']['num_clusters']}; "
        f"{table['paper_setting']['data']}",
        "- differs from the paper's setting: " + ("; ".join(table["differences"]) or "nothing in the budget"), "",
        f"| method | KNN F1 ({table['positive']}, k = 1) | linear F1 | DSMIL accuracy | AUC (neg.) | AUC (pos.) | "
        "test slides seen in pretraining (KNN / DSMIL) | paper: KNN F1 | paper: DSMIL accuracy / AUC (neg.) / "
        "AUC (pos.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in table["methods"].items():
        cells = [cell(row["scores"][name]) for name in
                 ("knn_f1", "linear_f1", "dsmil_accuracy", "dsmil_auc_negative", "dsmil_auc_positive")]
        dsmil = row["paper"]["dsmil"]
        paper_dsmil = " / ".join(f"{v:.3f}" for v in dsmil) if dsmil else "-"
        seen = " / ".join(row["test_slides_seen_in_pretraining"][where]["text"] for where in ("knn", "dsmil"))
        lines.append(f"| {method} | " + " | ".join(cells) +
                     f" | {seen} | {row['paper']['knn_f1']:.3f} | {paper_dsmil} |")
    for name, row in table["baselines"].items():
        lines.append(f"| {name} (baseline) | {cell({'mean': row['knn_f1'], 'std': 0.0})} | "
                     f"{cell({'mean': row['linear_f1'], 'std': 0.0})} | - | - | - | - | - | - |")
    lines += ["", "Scores: mean +- std over pretraining seeds (DSMIL: each the mean over its seeds). Reports: "
              "`knn/report.md`, `mil/<method>_seed<S>/report.md`; runs: `runs/`."]
    return lines


def cell(value: dict[str, float | None]) -> str:
    if value["mean"] is None:
        return "-"
    return f"{value['mean']:.3f}" + (f" +- {value['std']:.3f}" if value["std"] else "")


def main(argv: Sequence[str] | None = None) -> int:
    parsed: list = []
    status = run_command(lambda: parsed.append(parse(argv)))
    return status or run_command(lambda: reproduce(*parsed[0]))


if __name__ == "__main__":
    raise SystemExit(main())
