"""Does training with the batched views reach the same loss as with the paper's PIL views?

Trains the same configuration with ``--augment batched`` and ``--augment pil`` for several
seeds and compares the loss of the last epoch: the difference of the means against the
spread between seeds.

    python benchmarks/pipeline_loss.py --seeds 0 1 2 -- --config configs/demo.yaml --epochs 3
    python benchmarks/pipeline_loss.py --seeds 0 1 2 -- /data/patches --epochs 1 --batch_size 512

Everything after ``--`` goes to pretrain.py (without DATA_DIR: the demo set).
"""
import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

from clusiam.config import parse_config
from clusiam.train import train


def final_losses(pretrain_args: list[str], augment: str, seed: int, root: Path) -> dict[str, float]:
    run = root / f"{augment}_{seed}"
    train(parse_config([*pretrain_args, "--augment", augment, "--seed", str(seed), "--save_path", str(run)]))
    last = list(csv.DictReader(open(run / "logs" / "epochs.csv")))[-1]
    return {key: float(last[key]) for key in ("loss", "invariance", "cluster") if key in last}


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv[:split])
    pretrain_args = argv[split + 1 :]

    results = {"batched": [], "pil": []}
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for augment in results:
                results[augment].append(final_losses(pretrain_args, augment, seed, Path(root)))

    print(f"\nlast-epoch losses, pretrain.py {' '.join(pretrain_args)}")
    for name in results["pil"][0]:
        values = {augment: [r[name] for r in rows] for augment, rows in results.items()}
        spread = statistics.pstdev(values["batched"] + values["pil"]) or float("nan")
        gap = statistics.mean(values["batched"]) - statistics.mean(values["pil"])
        print(f"{name:<11} batched {statistics.mean(values['batched']):+.4f} "
              f"+- {statistics.pstdev(values['batched']):.4f}"
              f"   pil {statistics.mean(values['pil']):+.4f} +- {statistics.pstdev(values['pil']):.4f}"
              f"   gap {gap:+.4f} = {gap / spread:+.2f} x pooled std   per seed: "
              + ", ".join(f"{b:+.4f}/{p:+.4f}" for b, p in zip(values["batched"], values["pil"])))


if __name__ == "__main__":
    main()
