"""pretrain.py's options: a config file that is not YAML, numbers out of range, and output
folders that cannot be written are each refused up front, naming the file or flag."""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clusiam.config import build_parser, parse_config
from clusiam.errors import ConfigError
from clusiam.train import main

REPO = Path(__file__).resolve().parents[1]


def refusal(argv):
    """The message of the ConfigError that parse_config raises for ``argv``."""
    with pytest.raises(ConfigError) as error:
        parse_config(argv)
    return str(error.value)


def write_png(path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="PNG")


@pytest.mark.parametrize("name, content, message", [
    ("syntax.yaml", "lr: 0.1\nmean: [0.5, 0.5\nseed: 3\n",
     "syntax.yaml, line 3, column 5: expected ',' or ']', but got ':'; correct the YAML there"),
    ("tabs.yaml", "lr: 0.1\nmean:\n\t- 0.5\n",
     "tabs.yaml, line 3, column 1: found character '\\t' that cannot start any token; indent with spaces: "
     "YAML does not allow tabs"),
    ("random.yaml", np.random.default_rng(0).bytes(256), "random.yaml is not a YAML text file (byte 1: "),
    ("image.png", None, "image.png is not a YAML text file (byte 0: "),
])
def test_a_config_file_that_is_not_yaml_is_named_with_the_line(tmp_path, name, content, message):
    config = tmp_path / name
    if content is None:
        write_png(config)
    elif isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    text = refusal(["--config", str(config)])
    assert text.startswith(f"--config {tmp_path}/") and message in text
    assert "\n" not in text


@pytest.mark.parametrize("flag, values, message", [
    ("--lr", ["-0.1"], "--lr must be above 0 (got -0.1)"),
    ("--lr", ["0"], "--lr must be above 0 (got 0.0)"),
    ("--weight_decay", ["-0.0001"], "--weight_decay must be at least 0 (got -0.0001)"),
    ("--momentum", ["1"], "--momentum must be in [0, 1) (got 1.0)"),
    ("--tau", ["0"], "--tau must be above 0 (got 0.0)"),
    ("--tau", ["nan"], "--tau must be above 0 (got nan)"),
    ("--lr", ["nan"], "--lr must be above 0 (got nan)"),  # a diverging run is a test's doing, not an option
    ("--lr", ["inf"], "--lr must be above 0 (got inf)"),  # infinity passed "above 0" and failed at step 2
    ("--weight_decay", ["inf"], "--weight_decay must be at least 0 (got inf)"),
    ("--eps", ["-0.5"], "--eps must be above 0 (got -0.5)"),
    ("--target_momentum", ["1.5"], "--target_momentum must be in [0, 1] (got 1.5)"),
    ("--num_clusters", ["1"], "--num_clusters must be at least 2 (got 1)"),
    ("--feat_size", ["0"], "--feat_size must be at least 1 (got 0)"),
    ("--epochs", ["0"], "--epochs must be at least 1 (got 0)"),
    ("--batch_size", ["0"], "--batch_size must be at least 1 (got 0)"),
    ("--image_size", ["-32"], "--image_size must be at least 1 (got -32)"),
    ("--print_freq", ["0"], "--print_freq must be at least 1 (got 0)"),
    ("--save_freq", ["0"], "--save_freq must be at least 1 (got 0)"),
    ("--start_epoch", ["-1"], "--start_epoch must be at least 0 (got -1)"),
    ("--seed", ["-1"], "--seed must be at least 0 (got -1)"),
    ("--num_worker", ["-2"], "--num_worker must be at least 0 (got -2)"),
    ("--patch_mpp", ["0"], "--patch_mpp must be above 0 (got 0.0)"),
    ("--hed_jitter", ["1"], "--hed_jitter must be in [0, 1) (got 1.0)"),
    ("--mean", ["0.5", "1.2", "0.5"], "--mean must be in [0, 1] (got 1.2)"),
    ("--std", ["0.2", "0", "0.2"], "--std must be above 0 (got 0.0)"),
    ("--alpha", ["1.5"], "--alpha must be in [0, 1] (got 1.5)"),
])
def test_a_number_out_of_its_range_is_refused_naming_the_flag_and_the_rule(flag, values, message):
    assert refusal([flag, *values]) == message


def test_the_same_rules_check_a_config_file_and_help_states_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_clusters: 1\n")
    assert refusal(["--config", str(config)]) == f"--config {config}: --num_clusters must be at least 2 (got 1)"
    config.write_text("eps: -1.0e-8\n")  # a negative number in exponent notation is still read as a value
    assert refusal(["--config", str(config)]) == f"--config {config}: --eps must be above 0 (got -1e-08)"
    config.write_text("mean: [0.5, 0.5, -0.5]\nstd: [0.2, 0.2, 0.2]\n")
    assert refusal(["--config", str(config)]) == f"--config {config}: --mean must be in [0, 1] (got -0.5)"
    assert "(must be in [0, 1))" in " ".join(build_parser().format_help().split())  # --momentum, --hed_jitter
    # The rules that are not ranges stay: a baseline has no cluster head to weigh.
    assert refusal(["--model_type", "byol", "--alpha", "0.5"]) == \
        "--alpha 0.5: byol has no cluster head, so alpha must be 0"


def test_values_in_range_pass_including_the_edges():
    args = parse_config(["--momentum", "0", "--target_momentum", "1", "--hed_jitter", "0", "--num_clusters", "2",
                         "--seed", "0", "--num_worker", "0", "--alpha", "1", "--mean", "0", "1", "0.5",
                         "--std", "0.1", "0.2", "0.3"])
    assert (args.momentum, args.target_momentum, args.num_clusters, args.alpha) == (0.0, 1.0, 2, 1.0)
    assert args.mean == [0.0, 1.0, 0.5] and args.std == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("flag", ["--save_path", "--log_dst"])
def test_an_output_folder_that_is_a_file_or_lies_under_one_is_refused_before_any_work(tmp_path, capsys, flag):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    run = ["--save_path", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*run, flag, str(blocker)]) == 2
    assert capsys.readouterr().out == (f"error: {flag} {blocker} is a file, not a folder: pass a folder "
                                       "(it is created if needed)\n")
    assert main([*run, flag, str(blocker / "logs")]) == 2
    assert capsys.readouterr().out == (f"error: {flag} {blocker / 'logs'} cannot be created: {blocker} is a file, "
                                       "not a folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no run folder, no demo set


def without_write_override():
    """In the child, before it runs: leave root without CAP_DAC_OVERRIDE (the power to write
    whatever the permission bits say), so that a read-only folder is read-only to it too."""
    prctl, drop_from_bounding_set, cap_dac_override = ctypes.CDLL(None, use_errno=True).prctl, 24, 1
    if prctl(drop_from_bounding_set, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_save_path_this_user_cannot_write_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    as_root = os.geteuid() == 0
    try:
        result = subprocess.run(
            [sys.executable, str(REPO / "pretrain.py"), "--save_path", str(locked / "run"), "--device", "cpu"],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
            preexec_fn=without_write_override if as_root else None)
    except subprocess.SubprocessError as error:  # the capability could not be dropped here
        pytest.skip(f"running as root, and cannot drop CAP_DAC_OVERRIDE: {error}")
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == (f"error: --save_path {locked / 'run'}: {locked} is read-only or not writable by this "
                             "user; pass a folder you can write to\n")
    assert list(locked.iterdir()) == []
