"""The comparison benchmarks run for real on the CPU: the plain FFCV and DALI pipelines next to ours, and the
converter against FFCV's own writer. Speed is not asserted here (benchmarks, not timed tests): the rows, their
references and what the outputs hold are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import backend_unavailable
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD

NEEDS = [pytest.mark.skipif(bool(backend_unavailable("ffcv")), reason=backend_unavailable("ffcv") or "-"),
         pytest.mark.skipif(bool(backend_unavailable("dali")), reason=backend_unavailable("dali") or "-")]
pytestmark = [pytest.mark.slow, *NEEDS]
ROOT = Path(__file__).resolve().parents[1]


def test_bench_loader_times_every_plain_pipeline_next_to_ours(id_folder, tmp_path):
    from benchmarks import bench_loader

    out = tmp_path / "loader.json"
    assert bench_loader.main(["--data", str(id_folder), "--backends", "torch,ffcv,dali", "--modes", "crop",
                              "--size", "16", "--batch", "8", "--workers", "1", "--batches", "2", "--settle", "0",
                              "--repeats", "1", "--ffcv-max-res", "32", "--idle-wait", "0", "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"raw_decode", "torchvision", "torch", "ffcv-plain", "ffcv", "dali-plain", "dali"}
    for name, plain in (("torch", "torchvision"), ("ffcv", "ffcv-plain"), ("dali", "dali-plain")):
        r, p = rows[name], rows[plain]
        assert "skipped" not in r and "skipped" not in p, (r, p)
        assert r["vs_plain"] == pytest.approx(r["rates"][0] / p["rates"][0])
        assert r["vs_torchvision"] == pytest.approx(r["rates"][0] / rows["torchvision"]["rates"][0])


@pytest.mark.parametrize("plain", ["ffcv-plain", "dali-plain", "torchvision"])
def test_plain_pipelines_deliver_what_ours_deliver(plain, id_folder, tmp_path):
    """Normalised float [B,3,s,s]: the same contract as our backends, so the rates compare like with like."""
    from benchmarks import plain_loaders as pl
    from pipeline.convert_ffcv import ConvertSettings, convert

    dev = torch.device("cpu")
    if plain == "ffcv-plain":
        beton = tmp_path / "d.beton"
        convert(str(id_folder), str(beton), ConvertSettings(max_resolution=32, workers=1))
        run = pl.FFCVPlainRun(beton, 16, 4, 1, 1, 0, dev)
    elif plain == "dali-plain":
        run = pl.DALIPlainRun(id_folder, 16, 4, 1, 1, 0, dev)
    else:
        run = pl.TorchvisionRun(id_folder, 16, 4, 1, "crop", 1, 0, dev)
    batches = [b[0] for b in run.iter_epoch(1)]
    assert all(images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 for images in batches)
    # normalised, not [0, 1] or [0, 255]: over the epoch (one batch of 4 flat-coloured images, in FFCV's unseeded
    # order, can be all bright: that made this flaky), and every value is a pixel in [0, 255] normalised
    images = torch.cat(batches)
    assert images.min() < -0.5 and images.max() > 0.5
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = (images * std + mean) * 255
    assert pixels.min() > -1 and pixels.max() < 256


def test_bench_convert_compares_with_ffcvs_writer_and_both_outputs_read_back(id_folder, tmp_path):
    from ffcv.reader import Reader

    from benchmarks import bench_convert

    out = tmp_path / "convert.json"
    assert bench_convert.main(["--data", str(id_folder), "--max-res", "16", "--workers", "1", "--repeats", "1",
                               "--idle-wait", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["converter"] for r in rows] == ["ffcv_writer", "ours", "ours_no_passthrough"]
    assert rows[0]["vs_ffcv_writer"] == 1.0 and all(r["images_per_second"] > 0 for r in rows)
    # and the two writers produce readable .betons of the same images
    n = sum(1 for p in id_folder.rglob("*") if p.is_file())
    beton = tmp_path / "w.beton"
    mine = tmp_path / "o.beton"
    for cmd in (bench_convert.ffcv_writer(id_folder, beton, 16, 1), bench_convert.ours(id_folder, mine, 16, 1, True)):
        assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0, cmd
    for path in (beton, mine):
        r = Reader(str(path))
        assert r.num_samples == n
        assert np.asarray(r.metadata["f0"]["height"]).max() <= 16


@pytest.mark.parametrize("bench", ["bench_convert", "bench_loader"])
def test_comparison_benchmarks_refuse_a_folder_with_a_bad_file_in_one_line(bench, tmp_path, capsys):
    """Stock torchvision stops and FFCV's own writer hangs on an undecodable file: say so instead."""
    import importlib

    from PIL import Image

    (tmp_path / "d" / "c").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 40, 90)).save(tmp_path / "d" / "c" / f"{i}.jpg")
    (tmp_path / "d" / "c" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    mod = importlib.import_module(f"benchmarks.{bench}")
    assert mod.main(["--data", str(tmp_path / "d"), "--workers", "1", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.jpg" in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


def test_ffcv_index_reads_a_manifest_with_a_non_utf8_name(tmp_path):
    import os

    from PIL import Image

    from pipeline.convert_ffcv import ConvertSettings, convert
    from pipeline.ffcv_backend import ffcv_index

    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "d" / "c" / "a.jpg")
    Image.new("RGB", (16, 16)).save(os.fsdecode(os.fsencode(tmp_path / "d" / "c") + b"/caf\xe9.jpg"))
    convert(str(tmp_path / "d"), str(tmp_path / "o.beton"), ConvertSettings(max_resolution=16, workers=1))
    idx = ffcv_index(tmp_path / "o.beton")
    assert len(idx) == 2 and os.path.isfile(idx.abspath(1))


def run_module(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A benchmark as a user runs it (its own process, so a hang at exit shows), killed with everything it started
    on any exit of this test."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        try:  # descendants that outlived it (DataLoader workers reparented to init)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_dali_plain_rows_continue_their_epoch_into_the_next_and_the_benchmark_exits(id_folder, tmp_path):
    """DALI's iterator goes on from where the last repeat stopped: with 12 batches an epoch, 4 settle + 2 timed, the
    third repeat starts at the epoch's end (it used to raise 'fewer batches than --settle', then hang at exit)."""
    out = tmp_path / "r"
    run = run_module(["benchmarks.bench_loader", "--data", str(id_folder), "--backends", "dali", "--plain",
                      "dali-plain", "--modes", "crop", "--size", "16", "--batch", "4", "--workers", "1", "--batches",
                      "2", "--settle", "4", "--repeats", "4", "--idle-wait", "0", "--out", str(out)], timeout=240)
    assert run.returncode == 0, run.stdout[-2000:]
    (record,) = out.glob("bench_loader-*.json")  # under the folder the user named, not benchmarks/results
    rows = {r["backend"]: r for r in json.loads(record.read_text())["rows"]}
    assert len(rows["dali-plain"]["rates"]) == 4 and len(rows["dali"]["rates"]) == 4


BENCHMARKS = ["bench_loader", "bench_convert", "bench_step", "bench_e2e", "bench_classifier", "bench_bank",
              "bench_index", "tune", "bench_eval_memory", "bench_vote", "bench_torchrun_exit"]


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_flag_has_help_that_shows_its_default(name, monkeypatch):
    import argparse
    import importlib

    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    mod = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(_Parsed):
        (getattr(mod, "parse_args", None) or mod.main)([])
    (ap,) = parsers
    formatter = ap._get_formatter()
    flags = [a for a in ap._actions if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]
    assert {"--out", "--json"} <= {s for a in flags for s in a.option_strings}
    for a in flags:
        assert a.help, f"{name}: {a.option_strings[0]} has no help"
        assert "%(default)s" in formatter._get_help_string(a), f"{name}: {a.option_strings[0]} hides its default"
    ap.format_help()  # and the help renders (a stray % in a help string would raise here)
