"""What a run does when things go wrong around it: another run in its folder, a full disk, a
patch that cannot be read mid-run, a kill between saving and logging, bad checkpoints."""
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from clusiam.checkpoint import load_checkpoint
from clusiam.config import parse_config
from clusiam.errors import CheckpointError
from clusiam.files import write_atomically
from clusiam.runlock import LOCK_NAME, STALE_AFTER_S, RunLock
from clusiam.train import main, train
from conftest import epochs_csv, tiny_run_args

REPO = Path(__file__).resolve().parents[1]


def copy_demo(tiny_demo, folder, count=32):
    """The first ``count`` patches of the tiny demo set, in a folder of their own."""
    for i, source in enumerate(sorted(tiny_demo.rglob("*.png"))[:count]):
        target = folder / f"slide{i % 4}" / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return folder


def pretrain_command(*args):
    return [sys.executable, str(REPO / "pretrain.py"), *args]


# --- one run per folder -------------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_undisturbed(tiny_demo, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(pretrain_command(*tiny_run_args(tiny_demo, run, "--epochs", "3")),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = run / LOCK_NAME
    deadline = time.time() + 120
    while not lock.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.is_file(), "the first run never took its lock"
    second = main(tiny_run_args(tiny_demo, run, "--epochs", "1", "--resume", "auto"))
    refusal = capsys.readouterr().out
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert second == 2
    assert f"error: {run} is in use by another run: host {socket.gethostname()}, PID {first.pid}, started " in refusal
    assert load_checkpoint(run / "last.pth")["epoch"] == 3 and len(epochs_csv(run)) == 3
    assert not lock.exists()  # released when the run ended


def write_lock(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", "token": "old", **record}))
    return folder / LOCK_NAME


def finished_process_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_left_behind_is_taken_over_with_a_notice_and_a_live_one_is_not(tmp_path, capsys):
    here = socket.gethostname()
    cases = {
        "dead process here": ({"host": here, "pid": finished_process_pid()}, None, "is no longer running"),
        "silent other host": ({"host": "node-7", "pid": 1}, STALE_AFTER_S + 60, "nothing has touched it for"),
    }
    for name, (record, age, reason) in cases.items():
        lock = write_lock(tmp_path / name, **record)
        if age is not None:
            os.utime(lock, (time.time() - age, time.time() - age))
        taker = RunLock(tmp_path / name)
        assert taker.acquire() is None, name
        assert reason in capsys.readouterr().out
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        taker.release()
        assert not lock.exists()
    write_lock(tmp_path / "busy", host="node-7", pid=1)  # another host, touched just now
    refusal = RunLock(tmp_path / "busy").acquire()
    assert refusal.startswith(f"{tmp_path / 'busy'} is in use by another run: host node-7, PID 1, started 2026-01-01")
    (tmp_path / "mine").mkdir()
    holder = RunLock(tmp_path / "mine")
    assert holder.acquire() is None
    assert "is in use by another run" in RunLock(tmp_path / "mine").acquire()  # this very process is alive
    holder.release()


def test_two_writers_of_one_file_never_rename_each_others_temporary(tmp_path):
    target, errors = tmp_path / "last.pth", []
    payloads = [bytes([i]) * 200_000 for i in range(2)]

    def writer(payload):
        try:
            for _ in range(30):
                write_atomically(target, lambda temporary: temporary.write_bytes(payload))
        except Exception as error:  # what the shared temporary name used to raise: FileNotFoundError
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and target.read_bytes() in payloads and list(tmp_path.iterdir()) == [target]


# --- nothing half-written or misleading after a failure -------------------------------------

def fill_disk_while_resuming(run, command):
    """Run ``command`` (which resumes ``run``) where the disk is full: on a small tmpfs of
    its own when this machine lets a user namespace mount one, else under a file-size limit
    that the checkpoint exceeds. Returns the output, the exit status and the run folder after."""
    used = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode == 0:
        after = run.with_name("after")
        script = (f"mount -t tmpfs -o size={used + (4 << 20)} tmpfs /mnt && cp -r {run} /mnt/run && "
                  f"{' '.join(command).replace(str(run), '/mnt/run')}; status=$?; cp -r /mnt/run {after}; "
                  "exit $status")
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
        return result.stdout.replace("/mnt/run", str(run)), result.returncode, after

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    return result.stdout, result.returncode, run


def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_the_last_checkpoint_and_log(tiny_demo, tmp_path):
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1")))
    saved, logged = (run / "last.pth").read_bytes(), (run / "logs" / "epochs.csv").read_text()
    command = pretrain_command(*tiny_run_args(tiny_demo, run, "--epochs", "2", "--resume", "auto"))
    output, status, after = fill_disk_while_resuming(run, command)
    assert status == 2, output
    assert f"while writing {run}/last.pth" in output
    assert ("no space left on device" in output) or ("file too large" in output)
    assert f"Epoch 2 was not saved; the last good checkpoint {run}/last.pth is intact" in output
    assert (after / "last.pth").read_bytes() == saved
    assert (after / "logs" / "epochs.csv").read_text() == logged  # no row for the epoch that was not saved
    assert not [f.name for f in after.iterdir() if ".tmp." in f.name]


def test_a_run_stopped_between_its_checkpoint_and_its_log_row_writes_the_row_when_resumed(tiny_demo, tmp_path):
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1")))
    csv_path = run / "logs" / "epochs.csv"
    row = epochs_csv(run)[0]
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")  # as if killed before the row was written
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "2", "--resume", "auto")))
    rows = epochs_csv(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == row


def test_inputs_are_checked_before_a_run_folder_is_made(tiny_demo, tmp_path, capsys):
    data = copy_demo(tiny_demo, tmp_path / "data")
    (data / "slide0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(tiny_run_args(data, tmp_path / "bad_data", "--epochs", "1")) == 2
    assert main(tiny_run_args(tiny_demo, tmp_path / "bad_resume", "--resume", str(tmp_path / "nope.pth"))) == 2
    assert not (tmp_path / "bad_data").exists() and not (tmp_path / "bad_resume").exists()
    assert "broken.png: truncated PNG" in capsys.readouterr().out


def test_resume_names_a_folder_and_refuses_an_untrusted_checkpoint_for_safety(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint.parent
    with pytest.raises(CheckpointError, match=f"{folder} is a folder, not a checkpoint \\(it holds last.pth\\): "
                                              f"pass the checkpoint file, e.g. {folder / 'last.pth'}"):
        load_checkpoint(folder)
    payload = tmp_path / "payload.pth"
    torch.save({"epoch": 1, "config": {}, "run": Path("anything")}, payload)  # an object torch will not load safely
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(payload)
    assert "holds objects other than tensors and plain values, so it was refused for safety" in str(error.value)
    assert "weights_only" not in str(error.value)


# --- a patch that cannot be read mid-run ----------------------------------------------------

def png_that_passes_the_check_but_cannot_be_decoded(path, size=32):
    """A PNG whose chunks are whole (every checksum right, the end marker there) but whose
    pixel data is not a zlib stream: what a broken encoder, or a file replaced mid-run, gives."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data" * 20)
                     + chunk(b"IEND", b""))
    return path


def test_a_patch_that_cannot_be_decoded_is_named_or_with_skip_bad_files_replaced_and_listed(tiny_demo, tmp_path,
                                                                                              capsys):
    data = copy_demo(tiny_demo, tmp_path / "data")
    bad = png_that_passes_the_check_but_cannot_be_decoded(data / "slide1" / "999.png")
    assert main(tiny_run_args(data, tmp_path / "strict", "--epochs", "1")) == 2
    out = capsys.readouterr().out
    assert f"error: {bad}: cannot be decoded" in out and "--skip_bad_files" in out
    assert main(tiny_run_args(data, tmp_path / "strict", "--epochs", "1", "--num_worker", "1", "--mean", "0.5", "0.5",
                              "0.5", "--std", "0.2", "0.2", "0.2", "--resume", "auto")) == 2  # now in a worker
    assert f"error: {bad}: cannot be decoded" in capsys.readouterr().out

    run = tmp_path / "lenient"
    assert main(tiny_run_args(data, run, "--epochs", "2", "--skip_bad_files", "--num_worker", "1")) == 0
    out = capsys.readouterr().out
    listed = (run / "skipped_files.txt").read_text().splitlines()
    assert listed and all(line.startswith(f"{bad}\tcannot be decoded") for line in listed)
    assert "more patches or slides could not be read" in out and str(run / "skipped_files.txt") in out
    assert np.isfinite([float(r["loss"]) for r in epochs_csv(run)]).all() and len(epochs_csv(run)) == 2


# --- what refused and killed runs leave ---------------------------------------------------

def test_a_refused_run_leaves_no_folder(tiny_demo, tmp_path, capsys):
    """Every value is checked before the run folder exists: a batch the patches cannot fill, an
    infinite learning rate or weight decay (which used to pass and fail at step 2)."""
    data = copy_demo(tiny_demo, tmp_path / "data", count=12)
    refusals = {"--batch_size": ("only 12 usable images for --batch_size 16: lower --batch_size", []),
                "--lr": ("--lr must be above 0 (got inf)", ["--lr", "inf"]),
                "--weight_decay": ("--weight_decay must be at least 0 (got inf)", ["--weight_decay", "inf"])}
    for flag, (message, extra) in refusals.items():
        count = "12" if flag != "--batch_size" else "16"
        assert main(tiny_run_args(data, tmp_path / flag, "--batch_size", count, *extra)) == 2
        assert message in capsys.readouterr().out
        assert not (tmp_path / flag).exists()


def test_temporaries_a_killed_writer_left_go_with_the_next_start(tiny_demo, tmp_path, capsys):
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1")))
    dead = finished_process_pid()
    left = [run / f"last.tmp.{dead}-0123abcd.pth", run / "logs" / f"epochs.tmp.{dead}-89abcdef.csv"]
    live = run / f"normalization.tmp.{os.getpid()}-fedcba98.json"  # a writer still running: not ours to remove
    for path in (*left, live):
        path.write_bytes(b"half a checkpoint")
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "2", "--resume", "auto")))
    assert "note: removed 2 temporary file(s) a run killed while saving left behind" in capsys.readouterr().out
    assert not any(path.exists() for path in left) and live.exists()


def test_a_kill_after_the_last_checkpoint_loses_neither_its_row_nor_leaves_its_lock(tiny_demo, tmp_path, capsys):
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1")))
    row = epochs_csv(run)[0]
    csv_path = run / "logs" / "epochs.csv"
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")  # killed after last.pth, before its row
    write_lock(run, host=socket.gethostname(), pid=finished_process_pid())  # and its lock left behind
    assert main(tiny_run_args(tiny_demo, run, "--epochs", "1", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "is no longer running" in out
    assert epochs_csv(run) == [row] and not (run / LOCK_NAME).exists()
    assert not list((run / "logs").glob("events.out.tfevents.*"))[1:]  # the restore writes no event file of its own


def test_a_second_run_in_a_live_folder_is_told_it_is_in_use_before_anything_else(tiny_demo, tmp_path, capsys):
    """The first run has saved an epoch: the second is told the folder is in use, not to pass --resume
    auto (which would only have been refused as in use)."""
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1")))
    holder = RunLock(run)
    assert holder.acquire() is None  # a live run's lock: this process
    try:
        assert main(tiny_run_args(tiny_demo, run, "--epochs", "2")) == 2
        out = capsys.readouterr().out
    finally:
        holder.release()
    assert f"error: {run} is in use by another run" in out and "--resume auto" not in out


def test_bad_checkpoints_are_one_line_that_says_what_they_are(tiny_checkpoint, tiny_demo, tmp_path, capsys):
    state = load_checkpoint(tiny_checkpoint)
    weights = state["state_dict"]
    del weights["backbone.conv1.weight"], weights["backbone.bn1.weight"]  # as a network of another kind would lack them
    weights["head.extra"] = torch.zeros(3)
    weights["projector.layers.0.weight"] = weights["projector.layers.0.weight"][:, :7]
    misfit = tmp_path / "misfit.pth"
    torch.save(state, misfit)
    text = tmp_path / "text.pth"
    text.write_text("epoch,loss\n1,0.5\n")
    misfit_message = (f"{misfit}: its weights do not fit a clusiam resnet18 network with 2048 features and 8 "
                      "clusters: 2 missing (backbone.conv1.weight, backbone.bn1.weight); 1 unexpected (head.extra); "
                      "1 of another shape (projector.layers.0.weight)")
    text_message = f"{text} is not a checkpoint (torch.save writes a zip archive, and this file is not one"
    for checkpoint, message in ((misfit, misfit_message), (text, text_message)):
        assert main(tiny_run_args(tiny_demo, tmp_path / "run", "--epochs", "2", "--resume", str(checkpoint))) == 2
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1].startswith(f"error: {message}") and len(lines[-1]) < 400
        assert not (tmp_path / "run").exists()


def test_a_file_name_with_a_newline_keeps_the_error_on_one_line(tiny_demo, tmp_path, capsys):
    data = copy_demo(tiny_demo, tmp_path / "data")
    bad = data / "slide0" / "bad\nname.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(tiny_run_args(data, tmp_path / "run", "--epochs", "1")) == 2
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"error: {data / 'slide0'}/bad\\nname.png: truncated PNG")
