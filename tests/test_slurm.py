"""configs/slurm/pretrain.sbatch: its torchrun line passes torchrun only torchrun's options and
pretrain.py only pretrain.py's; outside a SLURM job it runs one torchrun on this machine (here: 2
CPU processes on the tiny demo); and a job SLURM requeued takes over the lock its preempted run
left, wherever that run was."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from torch.distributed.run import get_args_parser

from clusiam.checkpoint import load_checkpoint
from clusiam.config import build_parser
from clusiam.runlock import LOCK_NAME, RunLock
from conftest import epochs_csv, tiny_run_args

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "configs" / "slurm" / "pretrain.sbatch"
# Each shell word of the torchrun line, as a value the launcher could be given on a 2-node job.
SAMPLE_VALUES = {"$nodes": "2", "$nproc": "8", "${MAX_RESTARTS:-0}": "0", "$endpoint": "gpu-node-01:29742",
                 "$run_id": "123242", "$repo/pretrain.py": "pretrain.py"}


def torchrun_command() -> str:
    """The script's ``launch=(torchrun ...)`` lines."""
    match = re.search(r"^launch=\(torchrun\b.*?\)$", SCRIPT.read_text(), re.S | re.M)
    assert match, f"no launch=(torchrun ...) line in {SCRIPT}"
    return match.group(0)


def torchrun_words() -> list[str]:
    """The script's torchrun command, split into words as bash splits it (quotes removed)."""
    return shlex.split(torchrun_command().removeprefix("launch=(").removesuffix(")"))


def flags(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_the_torchrun_line_gives_each_program_only_its_own_options():
    words = torchrun_words()
    script = words.index("$repo/pretrain.py")
    launcher, trainer = words[1:script], words[script + 1:]
    assert {w for w in launcher if w.startswith("-")} - flags(get_args_parser()) == set()
    assert {w for w in trainer if w.startswith("-")} - flags(build_parser()) == set()
    assert trainer[-1] == "$@"  # the user's options come last, so they win over --resume auto

    parsed = get_args_parser().parse_args([SAMPLE_VALUES.get(word, word) for word in words[1:-1]])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id) == (
        "2", "8", "c10d", "gpu-node-01:29742", "123242")
    assert parsed.training_script == "pretrain.py"
    assert build_parser().parse_args(parsed.training_script_args).resume == "auto"


def test_the_slurm_page_quotes_the_scripts_torchrun_command_as_it_is():
    quoted = [line.removeprefix("    ") for line in (REPO / "docs" / "slurm.md").read_text().splitlines()]
    assert "\n".join(quoted).count(torchrun_command()) == 1


def test_outside_slurm_the_script_runs_one_torchrun_here_that_writes_one_checkpoint(tiny_demo, tmp_path):
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    environment.update(NPROC_PER_NODE="2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    result = subprocess.run(["bash", str(SCRIPT), *tiny_run_args(tiny_demo, run, "--epochs", "1")], cwd=tmp_path,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout
    assert "1 node(s) x 2 processes: torchrun --nnodes 1 --nproc_per_node 2" in result.stdout
    assert "2 processes (cpu), 8 images each" in result.stdout and result.stdout.count("done:") == 1
    checkpoint = load_checkpoint(run / "last.pth")
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["config"]["world_size"]) == (1, 4, 2)
    assert checkpoint["config"]["resume"] == "auto"
    assert [path.name for path in run.glob("*.pth")] == ["last.pth"]
    assert [row["epoch"] for row in epochs_csv(run)] == ["1"]


def test_a_requeued_job_takes_over_the_lock_its_preempted_run_left_on_another_node(tmp_path, monkeypatch, capsys):
    """SLURM ends a job before it requeues it, but the requeued job may start on another node
    within minutes, while the old lock still looks alive from there."""
    def leave_lock(folder: Path, job: str, restarts: int) -> None:
        folder.mkdir()
        (folder / LOCK_NAME).write_text(json.dumps({
            "host": "preempted-node", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "torchrun_job": job,
            "slurm_job": job, "slurm_restart": restarts, "token": "0123456789abcdef"}))

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    leave_lock(tmp_path / "requeued", "4242", 0)
    lock = RunLock(tmp_path / "requeued")
    assert lock.acquire() is None
    assert "it was left by this SLURM job before SLURM requeued it" in capsys.readouterr().out
    lock.release()
    for name, job, restarts in (("another job", "4243", 0), ("this run of the job", "4242", 1)):
        leave_lock(tmp_path / name, job, restarts)
        assert "is in use by another run: host preempted-node" in RunLock(tmp_path / name).acquire(), name
