"""File banks through train.py, killed (SIGKILL: no handler runs) and resumed with --run.resume=auto:

* mid-run, for an mmap bank with the full soft-max (pic.negatives=full, and recent with K >= N: the same path) and
  with recent negatives and bf16 rows, and for a host bank: the resumed run ends bit for bit equal to an
  uninterrupted one (bank files, checkpoint, backbone);
* between the writes of the end-of-run correction: the same;
* after a completed run, a fall-back to the checkpoint before (prev.pt) is refused in one line;
* between the bank's checkpoint (its journal started) and the rename of the new last.pt: the checkpoints from before
  (last.pt and prev.pt, or none yet) still resume bit for bit.
The checkpoint refers to an mmap bank's folder, never copies it. A finished run's last.pt holds its bank rows brought
up to date by the end-of-run correction whatever the storage (device and host banks: the rows an mmap bank holds in
its files).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, checkpoint_tensors, tiny_config

import train
from config import to_dict
from model.bank import BankFileError
from model.checkpoint import CheckpointError

EPOCHS, STEPS = 4, 12  # 48 images, batch 16: 3 steps per epoch (a checkpoint at the end of each)

# The child: train.py with one patch that ends the process with SIGKILL at a chosen point.
KILL_AFTER_STEP = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train
from model.step import TrainStep
call, after = TrainStep.__call__, int(sys.argv[2])
def step_then_die(self, images, ids, crops, step, *args, **kwargs):
    loss = call(self, images, ids, crops, step, *args, **kwargs)
    if step == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss
TrainStep.__call__ = step_then_die
train.main(sys.argv[3:])
"""
KILL_IN_CORRECTION = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import train
import model.bank.correction as c
real, total = c.correct_rows, int(sys.argv[2])
class DieOnUse(torch.Tensor):  # the corrected momentum: its first use comes after W's write
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        os.kill(os.getpid(), signal.SIGKILL)
def correct_then_die(w, u, last, now, *args, **kwargs):
    w, u = real(w, u, last, now, *args, **kwargs)
    return (w, u.as_subclass(DieOnUse)) if now >= total else (w, u)
c.correct_rows = correct_then_die
train.main(sys.argv[3:])
"""
KILL_BEFORE_RENAME = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train
import model.checkpoint as checkpoint
real, at = checkpoint.save_checkpoint, int(sys.argv[2])
def die_before_the_rename(path, cfg, trainer, bank, step, *args, **kwargs):
    if step == at:  # the bank's checkpoint(step) has run; the checkpoint files are those from before
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, cfg, trainer, bank, step, *args, **kwargs)
checkpoint.save_checkpoint = die_before_the_rename
train.main(sys.argv[3:])
"""


def config(id_folder, tmp_path, name: str, pic: dict):
    return tiny_config(str(id_folder), str(tmp_path), optim={"epochs": EPOCHS}, run={"name": name},
                       pic={"bank_file": str(tmp_path / f"{name}-bank"), **pic})


def killed_child(script: str, arg: int, cfg, tmp_path) -> None:
    f = tmp_path / f"{cfg.run.name}.json"
    f.write_text(json.dumps(to_dict(cfg)))
    r = subprocess.run([sys.executable, "-c", script, str(ROOT), str(arg), f"--config={f}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]


def assert_same_end(a, b, files: bool) -> None:
    """Run folders a and b (their banks in a-bank, b-bank beside them) ended alike."""
    ca, cb = (torch.load(r / "last.pt", weights_only=True) for r in (a, b))
    assert ca["progress"]["step"] == cb["progress"]["step"] == STEPS
    ta, tb = checkpoint_tensors(ca), checkpoint_tensors(cb)
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        assert torch.equal(v, tb[k]), k
    ba, bb = (torch.load(r / "backbone.pt", weights_only=True) for r in (a, b))
    assert all(torch.equal(v, bb[k]) for k, v in ba.items())
    if files:
        for name in ("weight.bin", "momentum.bin", "last.bin"):
            assert (a.parent / f"{a.name}-bank" / name).read_bytes() == \
                (b.parent / f"{b.name}-bank" / name).read_bytes(), name


PICS = {
    "mmap-full": {"negatives": "full", "bank_storage": "mmap"},
    "mmap-recent-k>=n": {"negatives": "recent", "k": 65536, "bank_storage": "mmap"},  # the default K: full too
    "mmap-recent-bf16": {"negatives": "recent", "k": 16, "bank_storage": "mmap", "bank_dtype": "bf16"},
    "host-recent-bf16": {"negatives": "recent", "k": 16, "bank_storage": "host", "bank_dtype": "bf16"},
}


@pytest.fixture(scope="module")
def uninterrupted(id_folder, tmp_path_factory):
    """The run of each case without a kill, trained once for the module."""
    done = {}

    def run(case: str):
        if case not in done:
            out = tmp_path_factory.mktemp("uninterrupted")
            train.train(config(id_folder, out, "a", PICS[case]))
            done[case] = out / "a"
        return done[case]

    return run


# after step 1: before the first checkpoint (an mmap bank is rolled back to its initial rows); after 4 or 7: rows
# written since the checkpoints of steps 3 and 6
@pytest.mark.parametrize("case,kill_after", [("mmap-full", 1), ("mmap-full", 4), ("mmap-recent-k>=n", 7),
                                             ("mmap-recent-bf16", 1), ("mmap-recent-bf16", 7),
                                             ("host-recent-bf16", 4)])
def test_a_bank_killed_mid_run_resumes_bit_for_bit(id_folder, tmp_path, uninterrupted, case, kill_after):
    pic = PICS[case]
    cfg = config(id_folder, tmp_path, "b", pic)
    killed_child(KILL_AFTER_STEP, kill_after, cfg, tmp_path)
    cfg.run.resume = "auto"
    assert train.train(cfg)["steps"] == STEPS
    assert_same_end(uninterrupted(case), tmp_path / "b", files=pic["bank_storage"] == "mmap")


def test_an_mmap_bank_killed_in_the_end_of_run_correction_resumes_bit_for_bit(id_folder, tmp_path, uninterrupted,
                                                                                capsys):
    """The correction of every stale row at the end, killed after it wrote W and before the momentum and `last`:
    the resumed run undoes the half-written chunk and corrects each row once. A fall-back to prev.pt after the
    correction is then refused in one line (its rows were rewritten without undo records)."""
    cfg = config(id_folder, tmp_path, "b", PICS["mmap-recent-bf16"])
    killed_child(KILL_IN_CORRECTION, STEPS, cfg, tmp_path)
    assert not (tmp_path / "b" / "backbone.pt").exists()
    cfg.run.resume = "auto"
    train.train(cfg)
    assert_same_end(uninterrupted("mmap-recent-bf16"), tmp_path / "b", files=True)
    (tmp_path / "b" / "last.pt").unlink()  # (lost): resume=auto takes prev.pt, from before the correction
    capsys.readouterr()
    assert train.main([f"--config={tmp_path / 'b.json'}", "--run.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was corrected at the end of its run (step {STEPS})" in err[0], err


def test_train_py_resumes_an_mmap_bank_from_the_previous_checkpoint_exactly(id_folder, tmp_path):
    """The checkpoint refers to the bank file, never copies it. The run is resumed from a checkpoint that the file
    has already moved past (rows of step 4 written, then a checkpoint at 5): the journal rolls it back, and the run
    ends bit-identical to an uninterrupted one."""
    def cfg(name, bank="", **run):
        return tiny_config(str(id_folder), str(tmp_path), optim={"epochs": 4},
                           pic={"negatives": "recent", "k": 16, "bank_storage": "mmap", "bank_dtype": "bf16",
                                "bank_file": str(tmp_path / f"{bank or name}-bank")}, run={"name": name, **run})

    train.train(cfg("a"))  # uninterrupted: 12 steps
    assert train.train(cfg("b", max_steps=4))["step"] == 4
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    rows = ck["bank"]["rows"]
    assert "weight" not in rows and rows["kind"] == "file" and rows["step"] == 4  # a reference, not a copy
    shutil.copy(tmp_path / "b" / "last.pt", tmp_path / "b4.pt")
    assert train.train(cfg("b", max_steps=1, resume="auto"))["step"] == 5
    train.train(cfg("b", resume=str(tmp_path / "b4.pt")))
    for name in ("weight.bin", "momentum.bin", "last.bin"):
        a, b = ((tmp_path / f"{r}-bank" / name).read_bytes() for r in "ab")
        assert a == b, name
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in "ab")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # another run on a's bank file: refused, naming the run that owns it (meta.json's owner)
    owner = re.escape(str((tmp_path / "a").resolve()))
    with pytest.raises(BankFileError, match=rf"no checkpoint is resumed: it belongs to the run in {owner} "
                                            r"\(checkpoint step 12\)"):
        train.train(cfg("c", bank="a"))
    assert not (tmp_path / "c" / "last.pt").exists()
    weight = (tmp_path / "b-bank" / "weight.bin").stat()
    with pytest.raises(CheckpointError, match="holds a bf16 bank; this run asks pic.bank_dtype=fp32"):
        c = cfg("b", resume=str(tmp_path / "b4.pt"))
        c.pic.bank_dtype = "fp32"
        train.train(c)
    assert (tmp_path / "b-bank" / "weight.bin").stat().st_mtime_ns == weight.st_mtime_ns  # refused before opening
    with pytest.raises(CheckpointError, match="holds a pic.bank_storage=mmap bank; this run asks host"):
        c = cfg("b", resume=str(tmp_path / "b4.pt"))
        c.pic.bank_storage, c.pic.bank_file = "host", str(tmp_path / "never-made")
        train.train(c)
    assert not (tmp_path / "never-made").exists()  # a refused resume makes no bank
    # a bank that looks killed before its first checkpoint is rolled back by its own run only, not taken over
    meta = json.loads((tmp_path / "a-bank" / "meta.json").read_text())
    (tmp_path / "a-bank" / "meta.json").write_text(json.dumps({**meta, "step": 0}))
    with pytest.raises(BankFileError, match=rf"it belongs to the run in {owner} \(checkpoint step 0\)"):
        train.train(cfg("c", bank="a", resume="auto"))


@pytest.mark.parametrize("kill_at", [3, 9])
def test_an_mmap_bank_killed_before_its_new_checkpoint_file_is_in_place_resumes_from_those_before(
        id_folder, tmp_path, uninterrupted, kill_at):
    """Killed after the bank's checkpoint of step 3 (the first: no checkpoint file yet) or 9 (last.pt is step 6,
    prev.pt step 3), before the new last.pt was renamed into place. The journals that the checkpoints there need are
    deleted only after the rename, and meta.json still names the newest one in place: resumed from last.pt, from
    prev.pt (last.pt lost), or, with none, from the bank's initial rows, the run ends bit for bit as an
    uninterrupted one."""
    cfg = config(id_folder, tmp_path, "b", PICS["mmap-recent-bf16"])
    killed_child(KILL_BEFORE_RENAME, kill_at, cfg, tmp_path)
    run, bank = tmp_path / "b", tmp_path / "b-bank"
    steps = [torch.load(run / n, weights_only=True)["progress"]["step"] for n in ("last.pt", "prev.pt")
             if (run / n).exists()]
    assert steps == ([] if kill_at == 3 else [6, 3])
    for folder in (run, bank):
        shutil.copytree(folder, tmp_path / f"{folder.name}.killed")
    cfg.run.resume = "auto"
    for lost in [()] if kill_at == 3 else [(), ("last.pt",)]:
        for folder in (run, bank):  # the folders as the kill left them
            shutil.rmtree(folder)
            shutil.copytree(tmp_path / f"{folder.name}.killed", folder)
        for name in lost:
            (run / name).unlink()  # resume=auto takes prev.pt
        assert train.train(cfg)["steps"] == STEPS
        assert_same_end(uninterrupted("mmap-recent-bf16"), run, files=True)


@pytest.mark.parametrize("storage,cache", [("device", "off"), ("host", "on")])
def test_a_finished_runs_last_pt_holds_its_bank_rows_brought_up_to_date(id_folder, tmp_path, capsys, storage,
                                                                         cache):
    """The end-of-run correction is saved whatever the storage: last.pt's rows of a device or host bank are, bit for
    bit, those an mmap bank of the same run holds in its files after the correction, and every row's `last` is the
    final step - 1. A resume of the complete run trains and writes nothing; a fall-back to prev.pt (last.pt lost)
    trains the last unit again and corrects again: the same last.pt."""
    pic = {"negatives": "recent", "k": 16, "bank_cache": cache}
    train.train(config(id_folder, tmp_path, "oracle", {**pic, "bank_storage": "mmap"}))
    cfg = config(id_folder, tmp_path, "b", {**pic, "bank_storage": storage})
    cfg.pic.bank_file = ""  # (a device bank has none; a host bank: its /dev/shm default)
    train.train(cfg)
    run = tmp_path / "b"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    rows = ckpt["bank"]["rows"]
    assert ckpt["progress"]["step"] == STEPS and rows["last"].eq(STEPS - 1).all(), rows["last"]
    for name, dtype in (("weight", torch.float32), ("momentum", torch.float32), ("last", torch.int64)):
        stored = (tmp_path / "oracle-bank" / f"{name}.bin").read_bytes()
        assert torch.equal(rows[name].flatten(), torch.frombuffer(bytearray(stored), dtype=dtype)), name
    files = {n: (run / n).read_bytes() for n in ("last.pt", "prev.pt", "config.json", "results.json")}
    cfg.run.resume = "auto"
    capsys.readouterr()
    train.train(cfg)
    assert f"is a complete run (step {STEPS}/{STEPS}): nothing to train" in capsys.readouterr().out
    assert {n: (run / n).read_bytes() for n in files} == files
    (run / "last.pt").unlink()
    assert train.train(cfg)["steps"] == STEPS
    again = checkpoint_tensors(torch.load(run / "last.pt", weights_only=True))
    assert again.keys() == checkpoint_tensors(ckpt).keys()
    assert all(torch.equal(v, again[k]) for k, v in checkpoint_tensors(ckpt).items())
