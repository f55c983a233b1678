"""Evaluation labels are class names mapped through the training set's classes, in all four evaluations: the
end-of-run kNN, the monitor, `eval.knn` and `eval.linear`.

Images of a class share its colour (light per-image variation), so even a random tiny CNN separates the classes:
kNN top-1 is ~100 % when the labels line up, and 0 % when a val folder's own numbering is used (a strict subset of
the training classes shifts every label). An unlabelled training image (directly under the root) must be left out
everywhere; a val class the training set lacks is left out and counted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from eval import knn, linear
from eval.common import run_cli
from eval.final import evaluate_run
from eval.monitor import Monitor
from model.checkpoint import backbone_state
from model.pic import build_pic
from pipeline.dataset import load_index

COLOURS = {"class_a": (220, 30, 30), "class_b": (30, 220, 30), "class_c": (30, 30, 220), "class_d": (220, 220, 30)}


def _folder(root, classes: dict[str, int], unlabelled: int = 0):
    rng = np.random.default_rng(len(classes))
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            c = np.clip(np.array(COLOURS[name]) + rng.integers(-12, 13, 3), 0, 255).astype(np.uint8)
            Image.fromarray(np.tile(c, (20, 20, 1))).save(root / name / f"{i:02d}.png")
    for i in range(unlabelled):
        Image.new("RGB", (20, 20), (128, 128, 128)).save(root / f"loose_{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("labels")
    train = _folder(base / "train", {"class_a": 8, "class_b": 8, "class_c": 8}, unlabelled=2)
    subset = _folder(base / "val_subset", {"class_b": 5, "class_c": 5})
    superset = _folder(base / "val_superset", {"class_a": 4, "class_b": 4, "class_c": 4, "class_d": 4}, unlabelled=1)
    model = build_pic("tiny", head_hidden=32, dim=16, seed=3)
    ckpt = base / "backbone.pt"
    torch.save(backbone_state(model, "tiny"), ckpt)
    return train, {"subset": subset, "superset": superset}, model, ckpt


VALS = ["subset", "superset"]


@pytest.mark.parametrize("val", VALS)
def test_eval_knn_cli(folders, capsys, val):
    train, vals, _, ckpt = folders
    args = ["--ckpt", str(ckpt), "--train", str(train), "--val", str(vals[val]), "--workers", "0", "--size", "16",
            "--k", "3"]
    assert run_cli(knn.main, args) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("kNN top-1 (k=3, T=0.07): ")[1].split()[0])
    assert top1 > 90, out
    queries = 10 if val == "subset" else 12  # the superset's class_d (4) and its unlabelled image are left out
    assert f"({queries} queries, 24 neighbours)" in out
    if val == "superset":
        assert "left out 4 of 1 class(es) the training set lacks (class_d) and 1 without a label" in out


@pytest.mark.parametrize("val", VALS)
def test_eval_linear_cli(folders, capsys, val):
    """The training folder holds unlabelled images (the probe used to stop on them); val classes by name."""
    train, vals, _, ckpt = folders
    args = ["--ckpt", str(ckpt), "--train", str(train), "--val", str(vals[val]), "--workers", "0", "--size", "16",
            "--cached", "--epochs", "60", "--lr", "1.0", "--batch-size", "8"]
    assert run_cli(linear.main, args) == 0
    out = capsys.readouterr().out
    assert float(out.split("linear probe: top-1 ")[1].split()[0]) > 90, out
    assert "linear probe training images" in out and "left out 2 without a label" in out


@pytest.mark.parametrize("val", VALS)
def test_end_of_run_knn(folders, tmp_path, val):
    train, vals, model, _ = folders
    cfg = tiny_config(str(train), str(tmp_path), data={"eval_path": str(vals[val])}, run={"eval": "auto", "knn_k": 3})
    res = evaluate_run(cfg, model, load_index(train), torch.device("cpu"))
    assert res["knn_top1"] > 90 and res["knn_neighbours"] == 24  # the 2 unlabelled training images are no neighbours
    assert res["knn_queries"] == (10 if val == "subset" else 12)
    assert res["knn_left_out_unknown_class"] == (0 if val == "subset" else 4)


@pytest.mark.parametrize("val", VALS)
def test_monitor(folders, tmp_path, val):
    from plan import resolve

    train, vals, model, _ = folders
    cfg = tiny_config(str(train), str(tmp_path), data={"eval_path": str(vals[val])},
                      run={"monitor_every": 1, "monitor_images": 64, "knn_k": 3})
    index = load_index(train)
    record = Monitor(cfg, index, resolve(cfg, len(index)), torch.device("cpu")).measure(model, 0, 0.0)
    assert record["knn_top1"] > 90, record
    queries = 10 if val == "subset" else 12
    assert record["knn_on"].startswith(f"{queries} eval_path images vs 24 training images")
    if val == "superset":
        assert "4 of classes the training set lacks, 1 unlabelled" in record["knn_on"]
