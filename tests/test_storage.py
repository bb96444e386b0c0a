"""Slides where labs keep them (clusiam/storage.py): tiling jobs and --coords/--slides folders
read from an S3 server (moto's, started here on 127.0.0.1) and from fsspec's memory
filesystem give the same tensors as the same files on a local disk."""
from __future__ import annotations

import json
import os
import shutil

import fsspec
import h5py
import numpy as np
import pytest
import torch

from clusiam import slides
from clusiam.checkpoint import load_checkpoint
from clusiam.errors import DataError
from clusiam.slide_source import SlideSource, folder_pairs, job_pairs
from clusiam.slides import LevelTiles, open_level
from clusiam.storage import BLOCK_SIZE, location
from conftest import tiny_run_args, write_pyramid
from test_features import slide_setup
from test_slide_source import write_job
from test_slides import he_image

BUCKET = "clusiam-tests"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 for this module, found by s3fs through the environment as a
    lab's own endpoint would be (AWS_ENDPOINT_URL); returns a function that uploads a folder."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)

    def upload(folder, name: str) -> str:
        fs.put(str(folder), f"{BUCKET}/{name}", recursive=True)
        return f"s3://{BUCKET}/{name}"

    yield upload
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def relative_job(setup) -> None:
    """The job records its slides relative to itself, so that it moves with them (here: to S3)."""
    record = setup.job / "job.json"
    slides = json.loads(record.read_text())["slides"]
    relative = {name: f"../slides/{location(path).name}" for name, path in slides.items()}
    record.write_text(json.dumps({"slides": relative}))


def test_slides_from_s3_and_from_memory_read_the_pixels_of_local_files(s3, tmp_path):
    setup = slide_setup(tmp_path)
    relative_job(setup)
    local, _ = SlideSource.checked(job_pairs(setup.job))
    expected = [np.asarray(local.read(index)) for index in range(len(local))]
    assert len(expected) == 16

    url = s3(tmp_path, "pixels")
    for remote in (job_pairs(f"{url}/job"), folder_pairs(f"{url}/job/coords", f"{url}/slides")):
        source, checked = SlideSource.checked(remote)
        assert checked.bad == [] and str(source.entries[0].path).startswith(f"{url}/slides/")
        np.testing.assert_array_equal(np.stack([source.read(index) for index in range(len(source))]),
                                      np.stack(expected))
        assert source.slides == local.slides and source.identity != local.identity  # another place, another key

    memory = fsspec.filesystem("memory")
    memory.put(str(tmp_path / "slides"), "/cohort/slides", recursive=True)
    memory.put(str(setup.job / "coords"), "/cohort/coords", recursive=True)
    source, _ = SlideSource.checked(folder_pairs("memory://cohort/coords", "memory://cohort/slides"))
    np.testing.assert_array_equal(np.stack([source.read(index) for index in range(len(source))]), np.stack(expected))


def test_a_job_on_s3_naming_local_slide_paths_is_refused_with_the_fix(s3, tmp_path):
    setup = slide_setup(tmp_path)  # its job.json names the slides by their absolute local paths
    url = s3(setup.job, "absolute-job")
    with pytest.raises(DataError, match=r"is a local path, but s3://.* record it relative to .* or as a URL"):
        job_pairs(url)


def test_pretraining_compute_feats_and_evaluate_knn_from_s3_equal_local_files(s3, tiny_checkpoint, tmp_path, capsys):
    from clusiam.knn_eval import main as knn_main
    from clusiam.train import main as train_main
    from mil.compute_feats import main as features_main

    job = write_job(tmp_path / "job", names=("a", "b"))
    shutil.move(tmp_path / "job_slides", tmp_path / "slides")
    (job / "job.json").write_text(json.dumps({"slides": {name: f"../slides/{name}.tif" for name in "ab"}}))
    url = s3(tmp_path, "training")
    options = ("--epochs", "1", "--seed", "4", "--num_worker", "2")  # DataLoader workers open their own S3 files
    assert train_main(tiny_run_args(job, tmp_path / "local_run", *options)) == 0
    assert train_main(tiny_run_args(f"{url}/job", tmp_path / "s3_run", *options)) == 0
    local, remote = (load_checkpoint(tmp_path / run / "last.pth") for run in ("local_run", "s3_run"))
    assert local["step"] == remote["step"] == 2
    for name, tensor in local["state_dict"].items():
        assert torch.equal(tensor, remote["state_dict"][name]), name

    (tmp_path / "eval").mkdir()
    setup = slide_setup(tmp_path / "eval")
    relative_job(setup)
    url = s3(tmp_path / "eval", "eval")
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--num_workers", "0", "--batch_size", "4"]
    for where, out in ((["--job", str(setup.job)], "local"), (["--job", f"{url}/job"], "s3"),
                       (["--coords", f"{url}/job/coords", "--slides", f"{url}/slides"], "s3_folders")):
        assert features_main([*common, *where, "--out", str(tmp_path / "bags" / out)]) == 0
        assert knn_main([*common, *where, "--train", str(setup.job / "train.csv"), "--test",
                         str(setup.job / "test.csv"), "--out", str(tmp_path / "knn" / out), "--k", "1",
                         "--no_baselines", "--no_embedding"]) == 0
    for out in ("s3", "s3_folders"):
        for bag in (tmp_path / "bags" / "local").glob("*.h5"):
            with h5py.File(bag) as want, h5py.File(tmp_path / "bags" / out / bag.name) as got:
                np.testing.assert_array_equal(got["features"][:], want["features"][:])
                np.testing.assert_array_equal(got["coords"][:], want["coords"][:])
        rows = [json.loads((tmp_path / "knn" / run / "report.json").read_text())["rows"] for run in ("local", out)]
        assert [row["f1"] for row in rows[0]] == [row["f1"] for row in rows[1]]
        assert [row["confusion_matrix"] for row in rows[0]] == [row["confusion_matrix"] for row in rows[1]]


def test_remote_tiles_come_in_few_merged_requests_and_are_cut_back_exactly(tmp_path, monkeypatch):
    """A request to object storage costs tens of milliseconds and its bytes little: the tiles a
    worker's part needs are fetched together, neighbours within BLOCK_SIZE in one request."""
    path = write_pyramid(tmp_path / "he.tif", he_image(640), mpp=0.25, downsamples=(1,), tile=64)
    memory = fsspec.filesystem("memory")
    memory.put(str(path), "/merged/he.tif")
    requests = []
    cat_ranges = type(memory).cat_ranges
    monkeypatch.setattr(type(memory), "cat_ranges",
                        lambda self, paths, starts, ends, **kw: requests.append(len(starts)) or cat_ranges(
                            self, paths, starts, ends, **kw))
    corners = [(int(x), int(y)) for x, y in np.random.default_rng(0).integers(-40, 600, (24, 2))]
    local = open_level(path, 0).regions(corners, 96)
    for gap in (0, BLOCK_SIZE):
        monkeypatch.setattr(slides, "BLOCK_SIZE", gap)
        remote = open_level(location("memory://merged/he.tif"), 0)
        assert isinstance(remote, LevelTiles)
        for got, want in zip(remote.regions(corners, 96), local):
            np.testing.assert_array_equal(got, want)
    unmerged, merged = requests
    assert merged == 1 and unmerged >= 10  # the file is under one block; its runs of tiles, apart, are many
