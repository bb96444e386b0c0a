"""What a probe (``pretrain.py --probe``) costs beside the epoch it follows.

    python benchmarks/probe_time.py --out /tmp/probe_time --patches 1024 --probe_patches 1000 -- --device cpu \\
        --batch_size 32 --num_worker 2

Cuts ``--patches`` real H&E patches of 224 px from the CC0 slide (or takes the PNG patches of
``--data``), labels the first
``--probe_patches`` of them into a probe table (eight pseudo-slides, one patch in five
"tumor": the labels change what the probe scores, not what it costs), trains one epoch on
all of them with that probe, and reads the epoch's and the probe's seconds from
``epochs.csv``. Probe time grows with the probe's patches and epoch time with the training
patches, so from the two measured rates it also gives the share at the defaults (a probe of
``--probe_max_patches`` 10,000 patches after every epoch) for training sets of typical sizes.
Options after ``--`` go to ``pretrain.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_patches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROBE = 10_000  # pretrain.py --probe_max_patches
TYPICAL_SETS = {"Camelyon16 (2.6 M patches)": 2_600_000, "1 M patches": 1_000_000, "100,000 patches": 100_000}


def probe_table(patches: Path, count: int, path: Path) -> None:
    files = sorted(patches.glob("*.png"))[:count]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "slide"])
        for index, file in enumerate(files):
            writer.writerow([str(file), "tumor" if index % 5 == 0 else "normal", f"region_{index % 8}"])


def measure(args: argparse.Namespace, extra: list[str]) -> dict:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    patches = args.data or out / "patches"
    if args.data is None and len(list(patches.glob("*.png"))) != args.patches:
        shutil.rmtree(patches, ignore_errors=True)
        make_patches(patches, args.patches, 224)
    probe_table(patches, args.probe_patches, out / "probe.csv")
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / "pretrain.py"), str(patches), "--save_path", str(run), "--epochs", "1",
                    "--probe", str(out / "probe.csv"), *extra], check=True, cwd=ROOT)
    with open(run / "logs" / "epochs.csv") as handle:
        (row,) = csv.DictReader(handle)
    epoch, probe = float(row["seconds"]), float(row["probe_seconds"])
    images_per_s = float(row["images_per_s"])
    probe_per_patch = probe / args.probe_patches
    return {
        "training_patches": len(list(patches.glob("*.png"))), "probe_patches": args.probe_patches,
        "epoch_seconds": epoch,
        "probe_seconds": probe, "measured_share": round(probe / epoch, 4), "training_images_per_s": images_per_s,
        "probe_patches_per_s": round(1 / probe_per_patch, 1),
        "share_at_defaults": {name: round(DEFAULT_PROBE * probe_per_patch / (size / images_per_s), 5)
                              for name, size in TYPICAL_SETS.items()},
        "pretrain_options": extra,
    }


def main() -> int:
    argv = sys.argv[1:]
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patches", type=int, default=1024, help="training patches (224 px, from the CC0 slide)")
    parser.add_argument("--data", type=Path, default=None, help="a folder of PNG patches to use instead")
    parser.add_argument("--probe_patches", type=int, default=1000, help="of them, the probe's")
    figures = measure(parser.parse_args(own), extra)
    print(f"epoch {figures['epoch_seconds']:.1f} s ({figures['training_images_per_s']:.1f} images/s), probe of "
          f"{figures['probe_patches']} patches {figures['probe_seconds']:.1f} s ({figures['probe_patches_per_s']:.1f} "
          f"patches/s): {100 * figures['measured_share']:.1f} % of this epoch")
    for name, share in figures["share_at_defaults"].items():
        print(f"at the defaults (a probe of {DEFAULT_PROBE} patches every epoch), training on {name}: "
              f"{100 * share:.2f} % of an epoch")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
