"""The online monitor (eval.monitor), TensorBoard scalars (eval.tensorboard_log) and the run report (eval.report).

The monitor must never change the training: a run with it ends with the same weights, bit for bit, as a run
without it (and a resume may change its settings); it leaves the global generators and the model's mode alone."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch
from conftest import checkpoint_tensors, tiny_config

import train
from eval.knn import knn_top1
from eval.monitor import Monitor, monitor_interval
from model.checkpoint import load
from model.trainer import build_trainer
from pipeline.dataset import load_index
from plan import resolve


def _events(run_dir, event="monitor") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r.get("event") == event]


def test_a_run_with_the_monitor_ends_with_the_same_weights_as_one_without(digits_root, tmp_path):
    data, val = str(digits_root / "train"), str(digits_root / "val")
    kw = dict(data={"subset": 96, "eval_path": val}, pic={"negatives": "recent", "k": 32})
    train.train(tiny_config(data, str(tmp_path / "off"), **kw))
    # with the monitor at every unit, stopped mid-run, resumed with another monitor setting (not a schedule key)
    on = dict(kw, run={"monitor_every": 2, "monitor_images": 40, "max_steps": 4})
    train.train(tiny_config(data, str(tmp_path / "on"), **on))
    rest = dict(kw, run={"monitor_every": 1, "monitor_images": 40, "resume": "auto"})
    train.train(tiny_config(data, str(tmp_path / "on"), **rest))
    a, b = load(tmp_path / "off" / "t" / "last.pt"), load(tmp_path / "on" / "t" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    a_tensors, b_tensors = checkpoint_tensors(a), checkpoint_tensors(b)
    for k in a_tensors:  # weights, the bank, BN running statistics
        assert torch.equal(a_tensors[k], b_tensors[k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    points = _events(tmp_path / "on" / "t")
    # units of 6 steps: the start (every 2nd unit, stopped at step 4), then, resumed with every unit: 6 and 12
    assert [p["step"] for p in points] == [0, 6, 12]
    for p in points:
        assert 0 <= p["knn_top1"] <= 100 and 0 <= p["retrieval_top1"] <= 100 and p["seconds"] > 0
        assert p["images"] == 40 and "eval_path" in p["knn_on"]
    assert not _events(tmp_path / "off" / "t")


def _monitor_setup(root, tmp_path, **run):
    cfg = tiny_config(str(root), str(tmp_path), run={"monitor_every": 1, **run})
    index = load_index(root)
    plan = resolve(cfg, len(index))
    model = build_trainer(cfg, len(index), torch.device("cpu"), plan=plan).model
    return Monitor(cfg, index, plan, torch.device("cpu")), model


def test_the_monitor_leaves_global_randomness_and_the_model_mode_alone(digits_root, tmp_path):
    monitor, model = _monitor_setup(digits_root / "train", tmp_path, monitor_images=64)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = monitor.measure(model, 0, 0.0)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BN stats untouched
    # no eval_path: leave-one-out kNN over the labelled subset; the same views every time
    assert "leave-one-out over 64" in first["knn_on"]
    again = monitor.measure(model, 0, 0.0)
    assert (again["knn_top1"], again["retrieval_top1"]) == (first["knn_top1"], first["retrieval_top1"])


def test_a_stop_between_two_batches_abandons_the_point_and_leaves_the_model_alone(digits_root, tmp_path):
    monitor, model = _monitor_setup(digits_root / "train", tmp_path, monitor_images=600)  # 3 batches of 256
    model.train()
    forwards = []
    model.backbone.register_forward_hook(lambda *_: forwards.append(1))
    assert monitor.measure(model, 0, 0.0, stop=lambda: len(forwards) >= 1) is None  # asked after batch 1
    assert len(forwards) == 1 and model.training and monitor.points == 0
    decoded = monitor.cache  # a stop while the subset is decoded: the next point decodes it again
    monitor.cache = None
    assert monitor.measure(model, 0, 0.0, stop=lambda: True) is None and monitor.cache is None
    monitor.cache = decoded
    forwards.clear()
    point = monitor.measure(model, 0, 0.0)  # without a stop, the whole point: 3 batches for kNN, 3 for retrieval
    assert len(forwards) == 6 and point["images"] == 600 and monitor.points == 1


# train.main() in a child whose backbone sleeps in eval mode (the monitor's batches) and notes each such batch
SLOW_MONITOR = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import model.backbone as bb
forward = bb.TinyCNN.forward
def slow(self, x):
    if not self.training:
        with open(os.environ["EVAL_BATCHES"], "a") as f:
            f.write("batch\n")
        time.sleep(1.0)
    return forward(self, x)
bb.TinyCNN.forward = slow
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_sigterm_during_a_monitor_point_is_honoured_after_its_current_batch(digits_root, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from conftest import ROOT

    batches = tmp_path / "eval_batches"
    args = [f"--data.path={digits_root / 'train'}", "--data.backend=memory", "--data.workers=0",
            "--data.image_size=16", "--data.eval_size=16", "--data.batch_size=16", "--model.arch=tiny",
            "--model.head_hidden=32", "--optim.epochs=2", "--run.eval=none", "--run.device=cpu", "--run.threads=1",
            "--run.monitor_images=1000", f"--run.out_dir={tmp_path}", "--run.name=m"]  # 1,000: 8 backbone batches
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MONITOR.format(root=str(ROOT)), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "EVAL_BATCHES": str(batches)})
    try:
        deadline = time.time() + 180
        while not batches.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert batches.exists(), "the monitor's first point never started"
        proc.send_signal(signal.SIGTERM)  # during the point before the first step
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: checkpoint saved at step 0" in out, out
        assert batches.read_text().count("batch") <= 2, out  # the batch in flight (and one begun as it came)
        assert not _events(tmp_path / "m")  # the abandoned point is not logged
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_an_unlabelled_set_gets_retrieval_only(tmp_path, digits_root):
    files = sorted((digits_root / "train").rglob("*.jpg"))[:30]
    (tmp_path / "list.txt").write_text("".join(f"{f.relative_to(digits_root / 'train')}\n" for f in files))
    cfg = tiny_config(str(tmp_path / "list.txt"), str(tmp_path), run={"monitor_every": 1})
    index = load_index(tmp_path / "list.txt", root=digits_root / "train")
    plan = resolve(cfg, len(index))
    model = build_trainer(cfg, len(index), torch.device("cpu"), plan=plan).model
    r = Monitor(cfg, index, plan, torch.device("cpu")).measure(model, 0, 0.0)
    assert "knn_top1" not in r and r["images"] == 30 and 0 <= r["retrieval_top1"] <= 100


def test_leave_one_out_knn_does_not_count_the_query_itself():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 0])  # the last point's nearest other is class 1: wrong, unless it votes itself
    assert knn_top1(feats, labels, feats, labels, k=1) == 100.0
    assert knn_top1(feats, labels, feats, labels, k=1, leave_one_out=True) == pytest.approx(80.0)


def test_auto_interval_gives_a_few_points(tmp_path):
    cfg = tiny_config("", str(tmp_path), optim={"epochs": 200}, run={"monitor_every": -1})
    plan = resolve(cfg, 1442)
    every = monitor_interval(cfg, plan)
    assert plan.num_units // every in (4, 5)
    cfg.run.monitor_every = 0
    assert monitor_interval(cfg, plan) == 0


def test_tensorboard_events_are_readable(digits_root, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (installed by tools/setup.sh)")
    from eval.tensorboard_log import read_scalars

    train.train(tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64},
                            run={"tensorboard": True, "monitor_every": 1, "monitor_images": 32}))
    run_dir = tmp_path / "t"
    assert list(run_dir.glob("events.out.tfevents.*"))
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))  # log_every=1: 2 units of 4 steps
    logged = [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "event" not in r]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(logged, rel=1e-6)
    for tag in ("train/lr", "train/images_per_s", "train/data_wait_pct", "train/nonfinite_losses"):
        assert len(scalars[tag]) == 8, tag
    assert [s for s, _ in scalars["monitor/retrieval_top1_pct"]] == [0, 4, 8]
    assert "monitor/knn_top1_pct" in scalars


def test_tensorboard_asked_for_but_missing_is_one_line(digits_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    rc = train.main([f"--data.path={digits_root / 'train'}", f"--run.out_dir={tmp_path}", "--run.device=cpu",
                     "--run.tensorboard=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pic[tensorboard]" in err[0]
    assert not (tmp_path / "pic").exists()  # stopped before any work


def test_report_draws_a_run_and_compares_two(digits_root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from eval import report

    small = dict(data={"subset": 64, "eval_path": str(digits_root / "val")},
                 run={"monitor_every": 1, "monitor_images": 32, "eval": "auto"})
    train.train(tiny_config(str(digits_root / "train"), str(tmp_path), **small))
    train.train(tiny_config(str(digits_root / "train"), str(tmp_path), optim={"lr": 0.05},
                            **dict(small, run={**small["run"], "name": "b", "max_steps": 5})))
    a, b = tmp_path / "t", tmp_path / "b"
    assert report.main([str(a)]) == 0
    assert (a / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (a / "report.html").read_text()
    for text in ("data:image/png;base64,", "Final results", "kNN top-1, held-out images", "Monitor points",
                 "optim.lr", "git_sha", "torch", "cpu.model"):
        assert text in page, text
    assert report.main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    assert (tmp_path / "cmp.png").stat().st_size > 10_000 and "t vs b" in page and "class=\"diff\"" in page
    capsys.readouterr()
    assert report.main([str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_compare_labels_which_knn_each_monitor_curve_measured(tmp_path, monkeypatch):
    """A run without a labelled eval_path monitors a leave-one-out kNN, one with it an eval_path kNN: overlaid,
    each curve says which, and the axis says that the two are not one measure."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from eval import report

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))

    def run(name: str, knn_on: str) -> report.Run:
        steps = [{"step": 0, "epoch": 1.0, "loss": 1.0, "lr": 0.1, "img_s": 1.0, "data_wait_pct": 0.0}]
        point = {"event": "monitor", "step": 0, "epoch": 0.0, "knn_top1": 50.0, "retrieval_top1": 10.0,
                 "seconds": 1.0, "knn_on": knn_on}
        return report.Run(name, tmp_path / name, steps, [point])

    loo, held_out = run("a", "leave-one-out over 40 training images"), run("b", "30 eval_path images vs 40 training "
                                                                                "images")
    report.draw([loo, held_out], tmp_path / "cmp.png")
    ax_knn = drawn[0].axes[1]
    assert [t.get_text() for t in ax_knn.get_legend().get_texts()] == [
        "a: monitor (leave-one-out on training images)", "b: monitor (eval_path queries)"]
    assert "not comparable" in ax_knn.get_title()
    report.draw([held_out, run("c", "30 eval_path images vs 40 training images")], tmp_path / "same.png")
    assert "not comparable" not in drawn[1].axes[1].get_title()


@pytest.mark.parametrize("negatives, k, want", [("recent", 64, 64 + 16), ("full", 64, 1000), ("recent", 4096, 1000)])
def test_report_chance_is_ln_of_the_softmax_width_and_accuracy_axes_stay_within_100(tmp_path, monkeypatch,
                                                                                   negatives, k, want):
    """The loss at chance is ln of the soft-max's real width: K + B with recent negatives (K < N), N otherwise;
    a kNN of 100 % keeps the accuracy axes at [0, 100]."""
    pytest.importorskip("matplotlib")
    import math

    import matplotlib.figure

    from eval import report

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig))
    steps = [{"step": s, "epoch": s / 4, "loss": 3.0, "lr": 0.1, "img_s": 1.0, "data_wait_pct": 0.0} for s in range(8)]
    point = {"event": "monitor", "step": 8, "epoch": 2.0, "knn_top1": 100.0, "retrieval_top1": 100.0, "seconds": 1.0,
             "knn_on": "30 eval_path images vs 40 training images"}
    config = {"config": {"pic": {"negatives": negatives, "k": k}, "data": {"batch_size": 16}},
              "resolved": {"num_instances": 1000}}
    run = report.Run("r", tmp_path, steps, [point], {"knn_top1": 100.0, "epochs": 2}, config)
    report.draw([run], tmp_path / "r.png")
    ax_loss, ax_knn, ax_ret = drawn[0].axes[:3]
    chance = [ln for ln in ax_loss.lines if ln.get_linestyle() == ":"]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(math.log(want))
    assert ax_knn.get_ylim() == (0, 100) and ax_ret.get_ylim() == (0, 100)
