"""Real data is dirty and real runs get killed: undecodable files in every backend and under torchrun, signals
while the loader waits, kill -9 and resume, a corrupt checkpoint, configurations that do not fit the data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    HOOKED_TRAIN,
    ROOT,
    checkpoint_tensors,
    decode_ids,
    free_port,
    no_aug,
    tiny_config,
    wait_until,
    write_id_folder,
)
from PIL import Image

import train
from config import apply_overrides, to_dict
from pipeline import backend_unavailable, make_loader
from pipeline.dataset import scan_folder

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(bool(backend_unavailable(b)), reason=backend_unavailable(b)))
            for b in ("torch", "torch-gpu", "memory", "ffcv", "dali")]
B = 8


def dirty_folder(root: Path, n: int, bad: list[int]) -> Path:
    """n colour-coded JPEGs (id i = file i), the files in `bad` made undecodable in three ways."""
    write_id_folder(root, n=n, classes=1)
    for k, i in enumerate(bad):
        f = root / "class_0" / f"img_{i:03d}.jpg"
        data = f.read_bytes()
        f.write_bytes([data[:len(data) // 2], b"not a jpeg at all" * 4, data[:40]][k % 3])
    return root


def data_path(backend: str, folder: Path, tmp_path: Path) -> str:
    if backend != "ffcv":
        return str(folder)
    from pipeline.convert_ffcv import ConvertSettings, convert

    beton = tmp_path / "d.beton"
    convert(str(folder), str(beton), ConvertSettings(max_resolution=40, write_mode="raw", workers=1))
    return str(beton)


class FixedOrder:
    def __init__(self, order):
        self.o = np.asarray(order, np.int64)

    def order(self, unit):
        return self.o


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_outnumbering_n_mod_b_end_the_run_at_the_planned_step(backend, tmp_path):
    # N = 43, B = 8: 5 full batches per epoch, N mod B = 3 < 5 bad files (the case that used to spin forever)
    folder = dirty_folder(tmp_path / "d", 43, bad=[1, 7, 20, 33, 41])
    cfg = no_aug(tiny_config(data_path(backend, folder, tmp_path), str(tmp_path / "runs"),
                             data={"backend": backend, "batch_size": B, "workers": 1},
                             optim={"epochs": 3, "warmup_epochs": 1}))
    out = train.train(cfg)
    assert out["steps"] == 3 * (43 // B) == len(out["losses"])
    run = tmp_path / "runs" / "t"
    listed = [line.split("\t")[0] for line in (run / "bad_files.tsv").read_text().splitlines()[1:]]
    assert sorted(map(int, listed)) == [1, 7, 20, 33, 41]  # each named once, whatever the epochs
    assert out["bad_files"] == 5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_whole_bad_batch_is_replaced_and_shapes_stay_fixed(backend, tmp_path):
    folder = dirty_folder(tmp_path / "d", 32, bad=list(range(8, 16)))  # batch 1 of the fixed order: all bad
    cfg = no_aug(tiny_config(data_path(backend, folder, tmp_path), str(tmp_path), data={"backend": backend}))
    if backend == "ffcv":
        from pipeline.ffcv_backend import ffcv_index

        index = ffcv_index(cfg.data.path)
    else:
        index = scan_folder(folder)
    loader = make_loader(cfg, index, FixedOrder(np.arange(32)), torch.device("cpu"), B)
    batches = [(b.ids.clone(), b.images.clone()) for b in loader.iter_epoch(0)]
    assert len(batches) == len(loader) == 4
    assert [ids.tolist() for ids, _ in batches][1] == [16] * 8  # the next decodable image stands in
    for ids, images in batches:
        assert images.shape == (B, 3, 16, 16) and decode_ids(images).tolist() == ids.tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("torch", "ffcv")])
def test_torchrun_two_ranks_with_bad_files_end_together_with_one_list(processes, backend, tmp_path):
    folder = dirty_folder(tmp_path / "d", 43, bad=[1, 7, 20])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=bad", str(ROOT / "train.py"),
           f"--data.path={data_path(backend, folder, tmp_path)}", f"--data.backend={backend}", "--data.workers=0",
           "--data.image_size=16",
           "--data.batch_size=8", "--model.arch=tiny", "--model.head_hidden=32", "--model.dim=16",
           "--optim.epochs=3", "--optim.warmup_epochs=1", "--run.eval=none", "--run.device=cpu",
           "--run.threads=1", f"--run.out_dir={tmp_path}", "--run.name=r"]
    r = processes.run(cmd, capture_output=True, text=True, timeout=280,
                      env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 3 * (43 // 2 // 4)  # per rank: 21 or 22 ids, batches of 4
    # one list for the run: rank 0 merged rank 1's finds into it (an ffcv run: the converter's rejects)
    assert [f.name for f in (tmp_path / "r").glob("bad_files*")] == ["bad_files.tsv"]
    listed = [line.split("\t") for line in (tmp_path / "r" / "bad_files.tsv").read_text().splitlines()[1:]]
    assert sorted(int(i) for i, _, _ in listed) == [1, 7, 20] and "3 undecodable image(s)" in r.stdout + r.stderr
    assert all(p == f"class_0/img_{int(i):03d}.jpg" and why for i, p, why in listed)
    if backend == "ffcv":
        assert all("rejected when d.beton was written" in why for _, _, why in listed)


# ---------------------------------------------------------------------------------------------------------------
# signals and kills
# ---------------------------------------------------------------------------------------------------------------

def child(processes, args: list[str], **env) -> subprocess.Popen:
    """train.py with the test hooks (tests/hooked_train.py) in a child process."""
    return processes.popen([sys.executable, str(HOOKED_TRAIN), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def torch_config(folder: Path, out: Path, **sections):
    cfg = tiny_config(str(folder), str(out), data={"backend": "torch", "batch_size": 8, "workers": 2},
                      optim={"epochs": 4, "warmup_epochs": 1}, run={"threads": 1})
    for section, values in sections.items():
        apply_overrides(cfg, {section: values})
    return cfg


def tiny_args(cfg, tmp_path: Path) -> list[str]:
    """The command line of `cfg` for a child process (the very same config, through --config)."""
    f = tmp_path / "child_config.json"
    f.write_text(json.dumps(to_dict(cfg)))
    return [f"--config={f}"]


def log_lines(log: Path) -> int:
    return log.read_text().count("\n") if log.exists() else 0


@pytest.mark.timeout(300)
def test_sigterm_while_the_loader_is_stuck_saves_and_exits_within_seconds(processes, tmp_path):
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)
    mark = tmp_path / "blocked"
    proc = child(processes, tiny_args(torch_config(folder, tmp_path, data={"backend": "torch", "batch_size": 8,
                                                                           "workers": 0},
                                                   run={"name": "k", "threads": 1}), tmp_path),
                 BLOCK_ON="img_040.jpg", BLOCKED_MARK=str(mark))
    log = tmp_path / "k" / "log.jsonl"
    wait_until(lambda: mark.exists() and log_lines(log) >= 1, "the loop blocked after a step", [proc])
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # the stuck wait is left at once: seconds, where the blocked read would take an hour
    assert time.monotonic() - t < 30 and proc.returncode == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out and "--run.resume=auto" in out
    ckpt = torch.load(tmp_path / "k" / "last.pt", weights_only=True)
    assert 0 < ckpt["progress"]["step"] == sum(1 for _ in log.read_text().splitlines())


@pytest.mark.timeout(300)
def test_ctrl_c_to_the_whole_process_group_with_loader_workers_saves(processes, tmp_path):
    """A terminal's Ctrl-C (or a scheduler's scancel) reaches the DataLoader workers too: they must leave the
    decision to the main process, which saves and exits with the resume hint."""
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)
    proc = processes.popen([sys.executable, str(HOOKED_TRAIN),
                            *tiny_args(torch_config(folder, tmp_path, run={"name": "k", "threads": 1}), tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "STEP_SLEEP": "0.2"})
    log = tmp_path / "k" / "log.jsonl"
    wait_until(lambda: log_lines(log) >= 3, "3 logged steps", [proc])
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "SIGINT: checkpoint saved" in out and "Traceback" not in out
    assert torch.load(tmp_path / "k" / "last.pt", weights_only=True)["progress"]["step"] >= 3


def test_a_folder_of_only_bad_images_is_a_one_line_error_with_the_list(tmp_path, capsys):
    folder = dirty_folder(tmp_path / "d", 6, bad=list(range(6)))
    rc = train.main([f"--data.path={folder}", "--data.backend=torch", "--data.workers=1", "--data.batch_size=2",
                     "--model.arch=tiny", f"--run.out_dir={tmp_path}", "--run.device=cpu", "--run.name=b"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no decodable image") and err.count("\n") == 1, err
    assert len((tmp_path / "b" / "bad_files.tsv").read_text().splitlines()) == 1 + 6


@pytest.mark.timeout(300)
def test_kill_9_after_a_unit_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(processes, tmp_path):
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)  # 6 steps per epoch, 24 in all
    ref = train.train(torch_config(folder, tmp_path / "ref"))
    proc = child(processes, tiny_args(torch_config(folder, tmp_path, run={"name": "k", "threads": 1}), tmp_path),
                 STEP_SLEEP="0.2")
    log = tmp_path / "k" / "log.jsonl"
    wait_until(lambda: log_lines(log) >= 8, "8 logged steps", [proc])  # one unit (6 steps) and a bit
    proc.kill()
    proc.wait()
    assert torch.load(tmp_path / "k" / "last.pt", weights_only=True)["progress"]["step"] >= 6
    lines_before = (tmp_path / "k" / "log.jsonl").read_text().count("\n")
    assert lines_before >= 8  # flushed line by line: a hard kill keeps the log
    resumed = train.train(torch_config(folder, tmp_path, run={"threads": 1, "name": "k", "resume": "auto"}))
    assert resumed["steps"] == ref["steps"] == 24
    a = checkpoint_tensors(torch.load(tmp_path / "ref" / "t" / "last.pt", weights_only=True))
    b = checkpoint_tensors(torch.load(tmp_path / "k" / "last.pt", weights_only=True))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_truncated_last_pt_falls_back_to_the_previous_checkpoint(id_folder, tmp_path, capsys):
    kw = dict(optim={"epochs": 3, "warmup_epochs": 1})
    ref = train.train(tiny_config(str(id_folder), str(tmp_path / "ref"), **kw))
    train.train(tiny_config(str(id_folder), str(tmp_path), run={"max_steps": 7}, **kw))  # units of 3 steps
    run = tmp_path / "t"
    assert torch.load(run / "prev.pt", weights_only=True)["progress"]["step"] == 6
    last = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(last[: len(last) // 3])
    out = train.train(tiny_config(str(id_folder), str(tmp_path), run={"resume": "auto"}, **kw))
    printed = capsys.readouterr().out
    assert "trying the previous checkpoint" in printed and "resumed from" in printed and "prev.pt at step 6" in printed
    assert out["steps"] == ref["steps"] == 9
    a = checkpoint_tensors(torch.load(tmp_path / "ref" / "t" / "last.pt", weights_only=True))
    b = checkpoint_tensors(torch.load(run / "last.pt", weights_only=True))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the corrupt file was set aside, not rotated over the good prev.pt by the next save
    assert (run / "last.pt.corrupt").exists()
    assert torch.load(run / "prev.pt", weights_only=True)["progress"]["step"] == 6


def test_resume_auto_without_a_checkpoint_says_it_starts_fresh(id_folder, tmp_path, capsys):
    train.train(tiny_config(str(id_folder), str(tmp_path), run={"resume": "auto", "max_steps": 1}))
    assert "no checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# configurations that do not fit the data
# ---------------------------------------------------------------------------------------------------------------


def test_window_scheduler_with_default_sizes_on_a_small_folder(tmp_path, capsys):
    folder = write_id_folder(tmp_path / "d", n=70, classes=2)
    out = train.train(tiny_config(str(folder), str(tmp_path), data={"scheduler": "window"},
                                  optim={"epochs": 2, "warmup_epochs": 1}))
    printed = capsys.readouterr().out
    assert "clamped to W=70, S=70" in printed
    assert out["steps"] == 2 * (70 // 16)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "class_0" / "img_000.jpg", "is an image, not a folder or a file list"),
    (lambda d: d.parent / "x.beton", "--data.backend=ffcv"),
])
def test_a_path_that_is_neither_folder_nor_list_is_a_one_line_error(tmp_path, capsys, make, message):
    folder = write_id_folder(tmp_path / "d", n=16, classes=1)
    path = make(folder)
    if not path.exists():
        path.write_bytes(b"\x00\x01binary")
    rc = train.main([f"--data.path={path}", f"--run.out_dir={tmp_path}", "--run.device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_binary_file_list_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "list.txt"
    f.write_bytes(bytes(range(256)) * 4)
    rc = train.main([f"--data.path={f}", f"--run.out_dir={tmp_path}", "--run.device=cpu"])
    assert rc == 2 and "not UTF-8 text" in capsys.readouterr().err


def test_a_warm_up_as_long_as_the_run_is_a_warning(id_folder, tmp_path, capsys):
    train.train(tiny_config(str(id_folder), str(tmp_path), optim={"epochs": 2, "warmup_epochs": 2},
                            run={"max_steps": 1}))
    assert "warning: the warm-up" in capsys.readouterr().out


def test_the_log_is_flushed_line_by_line_and_config_json_is_written_first(id_folder, tmp_path):
    train.train(tiny_config(str(id_folder), str(tmp_path), run={"max_steps": 2}))
    recs = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and (tmp_path / "t" / "config.json").exists()


def test_one_step_numbering_in_the_log_the_console_the_checkpoint_and_the_monitor(id_folder, tmp_path, capsys):
    """Every "step" counts the steps done: a log line after the 4th step, the console line printed with it, the
    checkpoint saved there and a monitor point taken there all say 4 (a 0-based log once said 3)."""
    out = train.train(tiny_config(str(id_folder), str(tmp_path), run={"max_steps": 4, "log_every": 2,
                                                                       "monitor_every": 1, "monitor_images": 16}))
    recs = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    training = [r["step"] for r in recs if "event" not in r]
    points = [r["step"] for r in recs if r.get("event") == "monitor"]
    console = [int(line.split("|")[0].split()[1]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("step ")]
    saved = torch.load(tmp_path / "t" / "last.pt", weights_only=True)["progress"]["step"]
    assert training == console == [2, 4] and out["step"] == saved == 4
    assert points[0] == 0 and points[-1] == 3  # units of 3 steps: before the first step, after the first unit


def test_checkpoint_at_every_unit_end_by_default(id_folder, tmp_path):
    out = train.train(tiny_config(str(id_folder), str(tmp_path), run={"max_steps": 4, "ckpt_every": 0}))
    assert out["step"] == 4
    # units of 3 steps: the unit end (step 3) made prev.pt, the stop at step 4 made last.pt
    assert torch.load(tmp_path / "t" / "prev.pt", weights_only=True)["progress"]["step"] == 3
    assert torch.load(tmp_path / "t" / "last.pt", weights_only=True)["progress"]["step"] == 4


def test_unused_image_is_never_trained_on_its_substitute_pixels(tmp_path):
    """The policy keeps each id with its own pixels: a bad file's id never appears in a batch."""
    folder = dirty_folder(tmp_path / "d", 24, bad=[3])
    cfg = no_aug(tiny_config(str(folder), str(tmp_path), data={"batch_size": B}))
    loader = make_loader(cfg, scan_folder(folder), FixedOrder(np.arange(24)), torch.device("cpu"), B)
    ids = torch.cat([b.ids for b in loader.iter_epoch(0)]).tolist()
    assert 3 not in ids and ids.count(4) == 2 and len(ids) == 24
    Image.open(folder / "class_0" / "img_004.jpg").verify()
