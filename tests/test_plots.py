import json

import pytest
from conftest import tiny_config

import train

pytest.importorskip("matplotlib")


def test_run_curves_and_benchmark_charts_are_drawn(digits_root, tmp_path):
    from benchmarks import plot as bench_plot
    from eval import plot as run_plot

    train.train(tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64}, run={"max_steps": 3}))
    assert run_plot.main([str(tmp_path / "t")]) == 0
    png = tmp_path / "t" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = {"benchmark": "bench_loader", "env": {"cpu": {"model": "x", "cores": 2}, "gpu": None, "git_sha": "abc"},
           "rows": [{"backend": "raw_decode", "mode": "decode", "images_per_second": 500.0},
                    {"backend": "torch", "mode": "crop", "images_per_second": 200.0},
                    {"backend": "dali", "mode": "crop", "skipped": "not installed"}]}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    assert bench_plot.main([str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.png").stat().st_size > 1000
    rec = {"benchmark": "bench_convert", "env": rec["env"],
           "rows": [{"converter": c, "max_res": m, "images_per_second": v}
                    for c, m, v in (("ffcv_writer", 256, 100.0), ("ours", 256, 120.0), ("ffcv_writer", 512, 90.0),
                                    ("ours", 512, 150.0))]}
    (tmp_path / "c.json").write_text(json.dumps(rec))
    assert bench_plot.main([str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    rec = {"benchmark": "bench_bank", "env": rec["env"],
           "rows": [{"N": n, "storage": s, "dtype": "bf16", "ms_median": ms, "bank_gb": n * 512e-9}
                    for n, s, ms in ((1e6, "host", 700.0), (1e7, "host", 720.0), (1e8, "mmap", 800.0))]
           + [{"N": 1e8, "storage": "mmap", "dtype": "bf16", "cache": True, "ms_median": 600.0, "bank_gb": 51.2}]}
    (tmp_path / "b.json").write_text(json.dumps(rec))
    assert bench_plot.main([str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 1000
