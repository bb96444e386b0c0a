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
from clusiam.best import score_names
from clusiam.distributed import DEVICE_HELP, add_dist_timeout
from clusiam.errors import CommandParser, ConfigError, InRange
from clusiam.files import check_output_folder
from clusiam.models import METHODS
from clusiam.order import SLIDES_PER_BATCH
from clusiam.slide_source import is_job


def build_parser() -> argparse.ArgumentParser:
    """Every option, with its default and, for numbers, the range it must lie in (checked as the
    command line or a config file is parsed; see :class:`clusiam.errors.InRange`)."""
    parser = CommandParser(
        prog="pretrain.py",
        description="Pretrain an encoder with CluSiam / CluBYOL (Wu et al., ICCV 2023) "
                    "or the SimSiam / BYOL baselines.",
    )
    parser.add_argument("data_dir", nargs="?", default=None, metavar="DATA_DIR",
                        help="folder of patch images at any depth, or a tiling job (python -m clusiam.tile --out: "
                             "a folder holding job.json, whose patches are read from its slides); omit to train on "
                             "the built-in demo set")
    parser.add_argument("--config", default=None, help="YAML file of options (configs/<name>.yaml); flags override it")

    model = parser.add_argument_group("model")
    model.add_argument("--model_type", default="clusiam", choices=list(METHODS),
                       help="the method: CluSiam or CluBYOL, or the SimSiam or BYOL baseline (each with its own "
                            "--feat_size, --alpha and --fix_pred_lr)")
    model.add_argument("--backbone", default="resnet18",
                       help="resnet18 (the paper's), resnet50, mit_b1 (SegFormer / LPD encoder) or a timm model name")
    model.add_argument("--init", default=None, metavar="FILE_OR_FOLDER",
                       help="start the backbone from these weights instead of random ones: a torchvision or timm "
                            "state dict, a hub folder (config.json + weights), or a clusiam checkpoint or export "
                            "(see clusiam/initial_weights.py); recorded in checkpoints, model cards and the ledger")
    model.add_argument("--num_clusters", default=100, type=int, action=InRange, at_least=2,
                       help="clusters K of the assigner")
    model.add_argument("--feat_size", default=None, type=int, action=InRange, at_least=1,
                       help="projector output size (default: 2048 SimSiam family, 256 BYOL family)")
    model.add_argument("--alpha", default=None, type=float, action=InRange, at_least=0, at_most=1,
                       help="cluster loss weight (default: 0.5 clusiam, 0.9 clubyol; must be 0 for the baselines)")
    model.add_argument("--tau", default=1.0, type=float, action=InRange, above=0, help="Gumbel-softmax temperature")
    model.add_argument("--target_momentum", default=0.99, type=float, action=InRange, at_least=0, at_most=1,
                       help="EMA momentum of the BYOL target network")
    model.add_argument("--cosine_target_momentum", default=False, action=argparse.BooleanOptionalAction,
                       help="ramp the target momentum to 1 with a cosine over training (BYOL's schedule)")
    model.add_argument("--eps", default=1e-8, type=float, action=InRange, above=0,
                       help="epsilon of the cosine and normalisation")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", default=50, type=int, action=InRange, at_least=1)
    optim.add_argument("--start_epoch", default=0, type=int, action=InRange, at_least=0,
                       help="ignored when --resume gives the epoch")
    optim.add_argument("--lr", default=0.05, type=float, action=InRange, above=0,
                       help="base learning rate; the SGD rate is lr * batch_size / 256")
    optim.add_argument("--weight_decay", default=1e-4, type=float, action=InRange, at_least=0)
    optim.add_argument("--momentum", default=0.9, type=float, action=InRange, at_least=0, below=1,
                       help="SGD momentum")
    optim.add_argument("--fix_pred_lr", default=None, action=argparse.BooleanOptionalAction,
                       help="keep the predictor at the initial learning rate (default: on for the SimSiam family, "
                            "SimSiam's recipe; off for the BYOL family)")
    optim.add_argument("--seed", default=0, type=int, action=InRange, at_least=0,
                       help="seeds every random draw (numpy's SeedSequence takes no negative seed)")
    optim.add_argument("--device", default="auto", help=DEVICE_HELP)
    optim.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                       help="bf16 autocast on GPU (the CPU always runs fp32)")
    add_dist_timeout(optim, "rank 0 checking images and computing statistics at the start")

    data = parser.add_argument_group("data")
    data.add_argument("--batch_size", default=512, type=int, action=InRange, at_least=1,
                      help="global batch: under torchrun it is split evenly over the processes (lr scales with it)")
    data.add_argument("--num_worker", default=8, type=int, action=InRange, at_least=0,
                      help="data loading processes (0 = in the main process)")
    data.add_argument("--image_size", default=224, type=int, action=InRange, at_least=1,
                      help="side of each augmented view, in pixels")
    data.add_argument("--patch_mpp", default=None, type=float, action=InRange, above=0,
                      help="microns per pixel of the training patches (0.5 = 20x); recorded in checkpoints and exports "
                           "(default: not recorded)")
    data.add_argument("--augment", default="batched", choices=["batched", "pil"],
                      help="batched: workers decode uint8 patches and the views are made in batch on the training "
                           "device; pil: the paper's pipeline, PIL transforms in the workers")
    data.add_argument("--vflip", default=False, action=argparse.BooleanOptionalAction,
                      help="pathology option: vertical flips (p = 0.5) as well as horizontal ones")
    data.add_argument("--rotate90", default=False, action=argparse.BooleanOptionalAction,
                      help="pathology option: random rotations by 0, 90, 180 or 270 degrees")
    data.add_argument("--hed_jitter", default=0.0, type=float, action=InRange, at_least=0, below=1,
                      help="pathology option: H&E stain jitter strength S, stains scaled by U(1-S, 1+S) "
                           "(Tellez et al. 2018 use 0.05); 0 = off")
    data.add_argument("--mean", default=None, type=float, nargs=3, action=InRange, at_least=0, at_most=1,
                      help="per-channel mean of pixel values / 255 (default: computed over the training files)")
    data.add_argument("--std", default=None, type=float, nargs=3, action=InRange, above=0,
                      help="per-channel std (default: computed over the training files)")
    data.add_argument("--coords", default=None, metavar="DIR",
                      help="instead of DATA_DIR: a folder of TRIDENT or CLAM coordinate files (<slide>_patches.h5, "
                           "<slide>.h5), whose patches are read from the slides in --slides")
    data.add_argument("--slides", default=None, metavar="DIR",
                      help="with --coords: the folder of the slides (<slide>.svs, .tif, .ndpi, ...) at any depth")
    data.add_argument("--patch_size", default=None, type=int, action=InRange, at_least=1,
                      help="read every patch from slides at this side in pixels, over the field of view its "
                           "coordinate file gives (default: the files' patch_size; needed when they differ)")
    data.add_argument("--slides_per_batch", default=SLIDES_PER_BATCH, type=int, action=InRange, at_least=1,
                      help="patches read from slides: every global batch mixes at least this many slides (when "
                           "there are as many of about equal size), while each DataLoader worker reads a few of "
                           "them at a time (see clusiam/order.py)")
    data.add_argument("--skip_bad_files", default=False, action=argparse.BooleanOptionalAction,
                      help="leave unreadable or too-small images, unreadable or mismatched slides and patches "
                           "wholly outside their slide out (listed in SAVE_PATH/skipped_files.txt) instead of stopping")

    probes = parser.add_argument_group("probes while training (see clusiam/probe.py)")
    probes.add_argument("--probe", default=None, metavar="TABLE",
                        help="labelled patches to score the backbone on while it trains: a CSV of path, label, slide, "
                             "a tiling job's patch_labels.csv (slide, x, y, label) or a folder root/<class>/<slide>/; "
                             "split by slide into SAVE_PATH/probe/train.csv and test.csv")
    probes.add_argument("--probe_every", default=1, type=int, action=InRange, at_least=1,
                        help="epochs between probes (the last epoch is always probed)")
    probes.add_argument("--probe_max_patches", default=10_000, type=int, action=InRange, at_least=1,
                        help="a seeded sample of at most this many patches of --probe is used")
    probes.add_argument("--probe_positive", default=None,
                        help="the class whose F1 the probes report (default: tumor)")
    probes.add_argument("--keep_best", default=None, metavar="METRIC", choices=score_names(clustered=True),
                        help="keep SAVE_PATH/best.pth beside last.pth: the checkpoint of the probed epoch with the "
                             "highest METRIC, one of the probe's scores (%(choices)s; the cluster ones for clusiam "
                             "and clubyol)")

    logging = parser.add_argument_group("logging and checkpoints")
    logging.add_argument("--print_freq", default=10, type=int, action=InRange, at_least=1,
                         help="steps between logged scalars")
    logging.add_argument("--save_freq", default=10, type=int, action=InRange, at_least=1,
                         help="epochs between checkpoints")
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
    values = load_yaml(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(map(str, set(values) - known))
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
            tokens.append(f"--{key}={value}")  # one token: argparse would take -1e-4 alone for a flag
    try:
        checked = vars(parser.parse_args(tokens))
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    return {key: values[key] if key == "data_dir" else checked[key] for key in values}


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a file that is not YAML text, or not valid YAML, is a
    ConfigError naming it and, where YAML knows it, the line."""
    try:
        # Bytes, not text: YAML then finds the encoding itself, and undecodable bytes are a ReaderError.
        return yaml.safe_load(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"--config {path} cannot be read ({error.strerror}): pass a YAML file you can read") from None
    except yaml.reader.ReaderError as error:  # not UTF-8 text, or control characters: an image, a checkpoint
        raise ConfigError(f"--config {path} is not a YAML text file (byte {error.position}: {error.reason}): "
                          "pass a YAML file of options, such as configs/clusiam.yaml") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context
        fix = ("indent with spaces: YAML does not allow tabs" if "'\\t'" in str(problem)
               else "correct the YAML there (see configs/ for examples)")
        raise ConfigError(f"--config {path}{where}: {problem}; {fix}") from None
    except yaml.YAMLError as error:
        one_line = " ".join(str(error).split())
        raise ConfigError(f"--config {path} is not valid YAML ({one_line}): correct it (see configs/ for examples)") \
            from None


def parse_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (after applying ``--config``) and fill the method's defaults."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, parser))
    args = parser.parse_args(argv)

    method = METHODS[args.model_type]
    if args.feat_size is None:
        args.feat_size = method.feat_size
    if args.alpha is None:
        args.alpha = method.alpha
    if args.fix_pred_lr is None:
        args.fix_pred_lr = method.fix_pred_lr
    if not method.clustered and args.alpha != 0:
        raise ConfigError(f"--alpha {args.alpha}: {args.model_type} has no cluster head, so alpha must be 0")
    try:
        backbone_family(args.backbone)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (args.mean is None) != (args.std is None):
        raise ConfigError("--mean and --std go together: give both or neither")
    if args.augment == "pil" and (args.vflip or args.rotate90 or args.hed_jitter):
        raise ConfigError("--vflip, --rotate90 and --hed_jitter need --augment batched")
    check_data_options(args)
    check_keep_best(args)
    args.save_path = args.save_path or os.path.join("runs", args.model_type)
    args.log_dst = args.log_dst or os.path.join(args.save_path, "logs")
    # Before any work (the demo set, the image check, the statistics): a run that cannot save is refused now.
    check_output_folder(args.save_path, "--save_path")
    check_output_folder(args.log_dst, "--log_dst")
    return args


def check_data_options(args: argparse.Namespace) -> None:
    """One source of patches: DATA_DIR (a patch folder or a tiling job), --coords with
    --slides, or neither (the demo set); --patch_size only where patches are read from slides."""
    if args.coords is not None and args.data_dir is not None:
        raise ConfigError(f"DATA_DIR {args.data_dir} and --coords {args.coords} are two sources of patches: pass a "
                          "patch folder or tiling job as DATA_DIR, or --coords DIR --slides DIR, not both")
    if (args.coords is None) != (args.slides is None):
        given, missing = ("--coords", "--slides") if args.slides is None else ("--slides", "--coords")
        raise ConfigError(f"{given} needs {missing}: pass --coords COORDS_DIR --slides SLIDES_DIR together")
    if args.patch_size is not None and args.coords is None and not is_job(args.data_dir):
        where = (f"DATA_DIR {args.data_dir} is a folder of patch images" if args.data_dir
                 else "no DATA_DIR was given (the demo set is patch images)")
        raise ConfigError(f"--patch_size reads patches from slides, but {where}: drop it, or pass a tiling job "
                          "(a folder with job.json) or --coords DIR --slides DIR")


def check_keep_best(args: argparse.Namespace) -> None:
    """--keep_best ranks the probed epochs by one of the probe's scores: it needs --probe, and
    a cluster score needs a method with clusters."""
    if args.keep_best is None:
        return
    if args.probe is None:
        raise ConfigError(f"--keep_best {args.keep_best} keeps the best probed epoch, and no --probe is given: pass "
                          "--probe TABLE, or drop --keep_best")
    scores = score_names(METHODS[args.model_type].clustered)
    if args.keep_best not in scores:
        raise ConfigError(f"--keep_best {args.keep_best}: {args.model_type} has no cluster head, so its probes score "
                          f"no clusters: pass one of {', '.join(scores)}")
