"""The tuner on a small folder: it stays within its budget, ranks two backends, and the train.py flags it
recommends start a run that trains."""

from __future__ import annotations

import json
import math
import shlex
import time

import pytest
from test_benchmarks import run_module

BUDGET = 60  # seconds; the tuner's default is 120


@pytest.mark.slow
def test_tuner_stays_in_budget_and_its_flags_train(id_folder, tmp_path):
    t = time.monotonic()
    run = run_module(["benchmarks.tune", str(id_folder), "--budget", str(BUDGET), "--backends", "torch,memory",
                      "--out", str(tmp_path / "rec"), "--model.arch=tiny", "--model.head_hidden=32",
                      "--data.image_size=16", "--data.batch_size=8"], timeout=BUDGET + 60)
    wall = time.monotonic() - t
    assert run.returncode == 0, run.stdout[-3000:]
    assert wall <= BUDGET + 5, f"took {wall:.0f} s for a budget of {BUDGET} s"  # + the interpreter's start
    (record,) = (tmp_path / "rec").glob("tune-*.json")
    rec = json.loads(record.read_text())
    timed = [r for r in rec["rows"] if "loader_img_s" in r]
    assert {r["backend"] for r in timed} == {"torch", "memory"}, rec["rows"]
    assert rec["step"]["images_per_second"] > 0 and rec["device"] in ("cpu", "cuda")
    flags = rec["recommended_flags"]
    assert f"--data.backend={rec['recommended']['backend']}" in flags
    assert "python train.py " + " ".join(flags) in run.stdout.replace("\n  ", " ")  # printed as it is recorded
    # the recommended flags start a run that trains
    train = run_module(["train", *flags, f"--run.out_dir={tmp_path}", "--run.name=r", "--run.max_steps=3",
                        "--run.eval=none", "--run.monitor_every=0", "--optim.epochs=2"], timeout=300)
    assert train.returncode == 0, train.stdout[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps and all(math.isfinite(s["loss"]) for s in steps), shlex.join(flags)
