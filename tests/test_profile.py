"""--run.profile=N: a real run writes a torch.profiler trace that a trace viewer reads, and says what it shows."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

import train
from config import ConfigError
from eval.step_profile import NAME_WIDTH


def test_profile_writes_a_readable_trace_of_n_real_steps(id_folder, tmp_path, capsys):
    cfg = tiny_config(str(id_folder), str(tmp_path), data={"backend": "torch", "workers": 1, "batch_size": 8},
                      optim={"epochs": 2}, run={"profile": 3})
    train.train(cfg)
    folder = tmp_path / "t" / "profile"
    traces = list(folder.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())  # the Chrome trace format: what TensorBoard's plugin reads too
    names = {e.get("name") for e in trace["traceEvents"] if e.get("ph") == "X"}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"]  # after 2 skipped + 1 warm-up step
    assert "data_wait" in names  # the loop's wait for its loader, as a range on its thread
    assert any(n.startswith("aten::convolution") for n in names)  # the model's operators
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["data_wait_pct"] <= 100
    assert summary["top_operators"] and all(op["name"] != "data_wait" for op in summary["top_operators"])
    out = capsys.readouterr().out
    top = summary["top_operators"][0]["name"][:NAME_WIDTH]  # under load a long one (the loader's __next__) can lead
    assert "profile of 3 step(s)" in out and "data wait:" in out and top in out


def test_profile_of_a_run_that_ends_first_keeps_the_steps_it_recorded(id_folder, tmp_path, capsys):
    cfg = tiny_config(str(id_folder), str(tmp_path), run={"profile": 50, "max_steps": 5})  # 3 warm-up, 2 recorded
    train.train(cfg)
    summary = json.loads((tmp_path / "t" / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert "profile of 2 step(s)" in capsys.readouterr().out


def test_a_negative_profile_is_a_config_error(id_folder, tmp_path):
    with pytest.raises(ConfigError, match="run.profile"):
        train.train(tiny_config(str(id_folder), str(tmp_path), run={"profile": -1}))
