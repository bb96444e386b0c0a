"""Command-line options of ``pretrain.py``, optionally read from a YAML file.

The authors' flags keep their names, meanings and defaults; ``--config FILE`` sets any of
them from YAML (keys are the option names without dashes) and flags given on the command
line override the file. Where a default depends on the method (``--feat_size``,
``--alpha``, ``--fix_pred_lr``), it is left unset here and filled from
:data:`clusiam.models.METHODS`.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from clusiam.backbones import backbone_family
from clusiam.distributed import add_dist_timeout
from clusiam.errors import ConfigError
from clusiam.models import METHODS


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, so callers can say which file a bad value came from."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pretrain.py",
        description="Pretrain an encoder with CluSiam / CluBYOL (Wu et al., ICCV 2023) "
                    "or the SimSiam / BYOL baselines.",
    )
    parser.add_argument("data_dir", nargs="?", default=None, metavar="DATA_DIR",
                        help="folder of patch images at any depth; omit to train on the built-in demo set")
    parser.add_argument("--config", default=None, help="YAML file of options (configs/<name>.yaml); flags override it")

    model = parser.add_argument_group("model")
    model.add_argument("--model_type", default="clusiam", choices=list(METHODS))
    model.add_argument("--backbone", default="resnet18",
                       help="resnet18 (the paper's), resnet50, mit_b1 (SegFormer / LPD encoder) or a timm model name")
    model.add_argument("--num_clusters", default=100, type=int, help="clusters K of the assigner")
    model.add_argument("--feat_size", default=None, type=int,
                       help="projector output size (default: 2048 SimSiam family, 256 BYOL family)")
    model.add_argument("--alpha", default=None, type=float,
                       help="cluster loss weight (default: 0.5 clusiam, 0.9 clubyol; must be 0 for the baselines)")
    model.add_argument("--tau", default=1.0, type=float, help="Gumbel-softmax temperature")
    model.add_argument("--target_momentum", default=0.99, type=float, help="EMA momentum of the BYOL target network")
    model.add_argument("--cosine_target_momentum", default=False, action=argparse.BooleanOptionalAction,
                       help="ramp the target momentum to 1 with a cosine over training (BYOL's schedule)")
    model.add_argument("--eps", default=1e-8, type=float, help="epsilon of the cosine and normalisation")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", default=50, type=int)
    optim.add_argument("--start_epoch", default=0, type=int, help="ignored when --resume gives the epoch")
    optim.add_argument("--lr", default=0.05, type=float,
                       help="base learning rate; the SGD rate is lr * batch_size / 256")
    optim.add_argument("--weight_decay", default=1e-4, type=float)
    optim.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    optim.add_argument("--fix_pred_lr", default=None, action=argparse.BooleanOptionalAction,
                       help="keep the predictor at the initial learning rate (default: on for the SimSiam family, "
                            "SimSiam's recipe; off for the BYOL family)")
    optim.add_argument("--seed", default=0, type=int)
    optim.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    optim.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                       help="bf16 autocast on GPU (the CPU always runs fp32)")
    add_dist_timeout(optim, "rank 0 checking images and computing statistics at the start")

    data = parser.add_argument_group("data")
    data.add_argument("--batch_size", default=512, type=int,
                      help="global batch: under torchrun it is split evenly over the processes (lr scales with it)")
    data.add_argument("--num_worker", default=8, type=int, help="data loading processes (0 = in the main process)")
    data.add_argument("--image_size", default=224, type=int, help="side of each augmented view, in pixels")
    data.add_argument("--patch_mpp", default=None, type=float,
                      help="microns per pixel of the training patches (0.5 = 20x); recorded in checkpoints and exports")
    data.add_argument("--augment", default="batched", choices=["batched", "pil"],
                      help="batched: workers decode uint8 patches and the views are made in batch on the training "
                           "device; pil: the paper's pipeline, PIL transforms in the workers")
    data.add_argument("--vflip", default=False, action=argparse.BooleanOptionalAction,
                      help="pathology option: vertical flips (p = 0.5) as well as horizontal ones")
    data.add_argument("--rotate90", default=False, action=argparse.BooleanOptionalAction,
                      help="pathology option: random rotations by 0, 90, 180 or 270 degrees")
    data.add_argument("--hed_jitter", default=0.0, type=float,
                      help="pathology option: H&E stain jitter strength (Tellez et al. 2018 use 0.05); 0 = off")
    data.add_argument("--mean", default=None, type=float, nargs=3,
                      help="per-channel mean (default: computed over the training files)")
    data.add_argument("--std", default=None, type=float, nargs=3,
                      help="per-channel std (default: computed over the training files)")
    data.add_argument("--skip_bad_files", default=False, action=argparse.BooleanOptionalAction,
                      help="leave unreadable or too-small images out (listed in SAVE_PATH/skipped_files.txt) "
                           "instead of stopping")

    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--print_freq", default=10, type=int, help="steps between logged scalars")
    logging.add_argument("--save_freq", default=10, type=int, help="epochs between checkpoints")
    logging.add_argument("--save_path", default=None,
                         help="run folder for checkpoints, statistics and logs (default: runs/<model_type>)")
    logging.add_argument("--log_dst", default=None,
                         help="folder for TensorBoard and the CSV log (default: SAVE_PATH/logs)")
    logging.add_argument("--resume", default=None, metavar="CHECKPOINT",
                         help="continue the run saved in this checkpoint (any number of processes); auto: "
                              "SAVE_PATH/last.pth if it exists. A torchrun restart resumes from it by itself")
    return parser


def read_config_file(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options set in a YAML file, checked by the same parser as the command line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (the recipes are in configs/)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    tokens: list[str] = []
    for key, value in values.items():
        if key == "data_dir":
            continue
        if isinstance(value, bool):
            tokens.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            tokens += [f"--{key}", *map(str, value)]
        elif value is not None:
            tokens += [f"--{key}", str(value)]
    try:
        checked = vars(parser.parse_args(tokens))
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    return {key: values[key] if key == "data_dir" else checked[key] for key in values}


def parse_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (after applying ``--config``) and fill the method's defaults."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, parser))
    args = parser.parse_args(argv)

    method = METHODS[args.model_type]
    args.feat_size = args.feat_size or method.feat_size
    if args.alpha is None:
        args.alpha = method.alpha
    if args.fix_pred_lr is None:
        args.fix_pred_lr = method.fix_pred_lr
    if not method.clustered and args.alpha != 0:
        raise ConfigError(f"--alpha {args.alpha}: {args.model_type} has no cluster head, so alpha must be 0")
    if not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha {args.alpha}: must lie in [0, 1]")
    try:
        backbone_family(args.backbone)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (args.mean is None) != (args.std is None):
        raise ConfigError("--mean and --std go together: give both or neither")
    for name in ("epochs", "batch_size", "image_size", "print_freq", "save_freq", "feat_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.augment == "pil" and (args.vflip or args.rotate90 or args.hed_jitter):
        raise ConfigError("--vflip, --rotate90 and --hed_jitter need --augment batched")
    if args.num_worker < 0:
        raise ConfigError(f"--num_worker must be 0 or more (got {args.num_worker})")
    args.save_path = args.save_path or os.path.join("runs", args.model_type)
    args.log_dst = args.log_dst or os.path.join(args.save_path, "logs")
    return args
