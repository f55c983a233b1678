"""File banks (model/bank/files.py, model/bank/journal.py): host shared memory and memory-mapped disk folders.

* the undo journal rolls an mmap bank back to the newest checkpoint or the one before (prev.pt), bit for bit;
* the end-of-run correction killed between its writes resumes exactly; after it, an older checkpoint is refused;
* a stale host bank of a killed run is removed before the free space is checked;
* a closing bank removes its files before it releases the folder's lock;
* a missing, mismatched, foreign, full or busy bank folder is one clear line.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_bank_rows import _threads, assert_equal_state, make, state, train  # noqa: F401 - the autouse fixture
from test_lazy_equivalence import STEPS, B, D, K, N

import model.bank.correction as correction_module
import model.bank.files as files_module
from model.bank import BankFileError, BankOptions, make_bank
from model.bank.files import LOCK_NAME, unresumed_bank_message


def test_an_mmap_bank_rolls_back_to_the_newest_checkpoint_or_the_one_before(tmp_path):
    folder = str(tmp_path / "bank")
    ref = make()
    train(ref, 0, STEPS)
    bank = make("mmap", folder=folder)
    train(bank, 0, 50)
    ckpt50 = {**copy.deepcopy(bank.checkpoint(50)), "state": state(bank)}
    train(bank, 50, 90)
    ckpt90 = {**copy.deepcopy(bank.checkpoint(90)), "state": state(bank)}
    train(bank, 90, 130)  # then killed: the file holds rows of steps 90..129, journal-90 their step-90 values
    assert (tmp_path / "bank" / f"journal-{90:012d}.bin").stat().st_size > 0
    for saved in (ckpt90, ckpt50):  # journal 90, then journals 90 and 50 newest first (prev.pt)
        again = make("mmap", folder=folder)  # a new process maps the same file
        assert not again.rows.created
        again.restore(saved)
        assert_equal_state(state(again), saved["state"])
        assert again.negatives.state_dict()["recent"].tolist() == saved["negatives"]["recent"].tolist()
        train(again, saved["rows"]["step"], STEPS)
        assert_equal_state(state(again), state(ref))


class KillOnUse(torch.Tensor):
    """The corrected momentum of one chunk: the first torch operation on it ends the correction, as a kill would
    between the chunk's writes of W and of the momentum."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise KeyboardInterrupt("killed mid-correction")


def interrupting_correction(calls: list):
    real = correction_module.correct_rows

    def corrected(w, u, last, now, *args, **kwargs):
        w, u = real(w, u, last, now, *args, **kwargs)
        calls.append(len(last))
        return (w, u.as_subclass(KillOnUse)) if len(calls) == 2 else (w, u)

    return corrected


def test_the_end_of_run_correction_killed_between_its_writes_resumes_exactly(tmp_path, monkeypatch):
    """Rows corrected in chunks; the second chunk is interrupted after its W was written. The resumed bank undoes
    the half-written chunk (correction-undo.bin), keeps the finished chunk (last = now − 1: not corrected twice) and
    ends equal to an uninterrupted correction."""
    ref = make("mmap", folder=str(tmp_path / "ref"))
    train(ref, 0, STEPS)
    ref.checkpoint(STEPS)
    ref.bring_up_to_date(STEPS)
    monkeypatch.setattr("model.bank.rows.CORRECTION_CHUNK_ROWS", 16)  # 4 chunks of the 64 rows
    bank = make("mmap", folder=str(tmp_path / "bank"))
    train(bank, 0, STEPS)
    saved = copy.deepcopy(bank.checkpoint(STEPS))
    calls = []
    monkeypatch.setattr(correction_module, "correct_rows", interrupting_correction(calls))
    with pytest.raises(KeyboardInterrupt):
        bank.bring_up_to_date(STEPS)
    monkeypatch.undo()
    assert len(calls) == 2 and (tmp_path / "bank" / "correction-undo.bin").stat().st_size > 0
    again = make("mmap", folder=str(tmp_path / "bank"))
    again.restore(saved)
    assert not (tmp_path / "bank" / "correction-undo.bin").exists()
    again.bring_up_to_date(STEPS)
    assert_equal_state(state(again), state(ref))
    # a checkpoint from before the correction: its rows were rewritten without undo records, refused in one line
    with pytest.raises(BankFileError, match=rf"was corrected at the end of its run \(step {STEPS}\) after this "
                                            r"checkpoint \(step 150\)"):
        make("mmap", folder=str(tmp_path / "bank")).restore({**saved, "rows": {**saved["rows"], "step": 150}})


def _stale_host_bank(folder, n: int) -> None:
    """A host bank made by another process that is then killed (SIGKILL: nothing is cleaned up)."""
    code = ("import os, signal, sys, torch; sys.path.insert(0, sys.argv[2]); from model.bank import BankOptions, "
            "make_bank; make_bank(BankOptions(dim=8, storage='host', folder=sys.argv[1]), int(sys.argv[3]), "
            "generator=torch.Generator().manual_seed(0)); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(ROOT), str(n)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_a_stale_host_bank_of_a_killed_run_is_removed_before_the_room_is_checked(tmp_path, monkeypatch, capsys):
    """A host bank left in /dev/shm by a SIGKILLed run used to count as used space: a bank over half of the folder's
    room was refused. A file system of 1.5 banks of room is simulated around the real files."""
    n, d = 1 << 15, 8
    folder = tmp_path / "shm"
    _stale_host_bank(folder, n)
    assert {"weight.bin", "momentum.bin", "last.bin"} <= {p.name for p in folder.iterdir()}
    need = n * (2 * d * 4 + 8)
    real = os.statvfs

    class OneAndAHalfBanks:  # free = capacity − what the folder's files occupy
        def __init__(self, path):
            used = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
            self.f_frsize, self.f_bavail = real(path).f_frsize, (3 * need // 2 - used) // real(path).f_frsize

    monkeypatch.setattr(files_module.os, "statvfs", OneAndAHalfBanks)
    bank = make_bank(BankOptions(dim=d, storage="host", folder=str(folder)), n)
    assert "of a bank left in" in capsys.readouterr().out
    bank.close()
    assert not folder.exists()


def test_a_closing_bank_removes_its_files_before_it_releases_the_lock(tmp_path, monkeypatch):
    """Another process may lock the folder the moment the lock is released and start a bank there: nothing of the
    old bank may be deleted after that."""
    folder = tmp_path / "bank"
    bank = make("host", folder=str(folder))
    seen = []
    real = files_module.unlock

    def unlock(fd):
        seen.append(sorted(p.name for p in folder.iterdir()) if folder.exists() else [])
        real(fd)

    monkeypatch.setattr(files_module, "unlock", unlock)
    bank.close()
    assert seen == [[]]
    assert not folder.exists()


def test_bank_file_errors_are_one_clear_line(tmp_path):
    folder = tmp_path / "bank"
    bank = make("mmap", folder=str(folder))
    train(bank, 0, 20)
    ckpt = copy.deepcopy(bank.checkpoint(20))
    bank.committed(20)
    train(bank, 20, 40)
    for step in (40, 60):  # each checkpoint's file renamed into place: journal-20 (before prev.pt's 40) deleted
        bank.checkpoint(step)
        bank.committed(step)
    with pytest.raises(BankFileError, match="cannot be rolled back to step 20"):
        make("mmap", folder=str(folder)).restore(ckpt)
    with pytest.raises(BankFileError, match="num_instances=64 but this run has num_instances=65"):
        make_bank(BankOptions(dim=D, negatives="recent", k=K, batch_size=B, storage="mmap", folder=str(folder)),
                  N + 1)
    with pytest.raises(BankFileError, match="dtype='fp32' but this run has dtype='bf16'"):
        make("mmap", "bf16", str(folder))
    make("mmap", folder=str(tmp_path / "other"))
    other = make("mmap", folder=str(tmp_path / "other"))  # an existing bank, but not the checkpoint's
    with pytest.raises(BankFileError, match="this run maps"):
        other.restore(ckpt)
    meta = json.loads((folder / "meta.json").read_text())
    with pytest.raises(BankFileError, match="belongs to another run"):
        make("mmap", folder=str(folder)).restore({**ckpt, "rows": {**ckpt["rows"], "run_id": "x"}})
    assert meta["step"] == 60
    missing = make("mmap", folder=str(tmp_path / "gone"))  # not there: made fresh, then the checkpoint refers to it
    with pytest.raises(BankFileError, match="not found"):
        missing.restore({**ckpt, "rows": {**ckpt["rows"], "path": str(tmp_path / "gone")}})
    assert not (tmp_path / "gone").exists()  # the useless fresh file is removed again
    (folder / "weight.bin").write_bytes(b"short")
    with pytest.raises(BankFileError, match="weight.bin: 5 bytes"):
        make("mmap", folder=str(folder))


def test_an_unresumed_bank_names_its_owner_in_one_line(tmp_path):
    """The owner comes from meta.json: a folder that is gone says so; a bank from before owners were recorded is
    named by its run id."""
    bank = make("mmap", folder=str(tmp_path / "bank"))
    assert "owner" not in bank.rows.meta
    bank.rows.set_owner(str(tmp_path / "gone"))
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta["owner"] == str(tmp_path / "gone") and meta["run_id"] == bank.rows.meta["run_id"]
    msg = unresumed_bank_message(tmp_path / "bank", meta)
    assert f"belongs to the run in {tmp_path / 'gone'} (checkpoint step 0, a folder that no longer exists)" in msg
    del meta["owner"]
    msg = unresumed_bank_message(tmp_path / "bank", meta)
    assert f"run id {meta['run_id']}" in msg and "\n" not in msg and "--run.resume=auto" in msg


def test_an_mmap_bank_killed_before_its_first_checkpoint_rolls_back_to_its_initial_rows(tmp_path):
    """A new bank starts journal-0; a run killed before its first checkpoint left rows written since, and the same
    run continuing (resume=auto: torchrun's restart) rolls them back; another run is refused, naming the owner."""
    options = BankOptions(dim=D, negatives="recent", k=K, batch_size=B, storage="mmap", folder=str(tmp_path / "b"))
    owner = tmp_path / "run"
    owner.mkdir()
    bank = make_bank(options, N, generator=torch.Generator().manual_seed(1), owner=owner)
    initial = state(bank)
    train(bank, 0, 40)  # then killed
    assert not torch.equal(state(bank)[0], initial[0])
    with pytest.raises(BankFileError, match=rf"it belongs to the run in {re.escape(str(owner.resolve()))} "
                                            r"\(checkpoint step 0\)"):
        make_bank(options, N, owner=tmp_path / "another", continuing=True)
    with pytest.raises(BankFileError, match="no checkpoint is resumed"):
        make_bank(options, N, owner=owner, continuing=False)  # a fresh run does not take it over either
    again = make_bank(options, N, owner=owner, continuing=True)
    assert not again.rows.inner.created
    assert_equal_state(state(again), initial)


def test_a_folder_without_room_for_the_bank_is_one_clear_error(tmp_path, monkeypatch):
    """The bank files are sparse: without this check a small /dev/shm (Docker: 64 MB) would be a SIGBUS mid-run."""
    real = os.statvfs

    class Full:
        def __init__(self, path):
            self.f_frsize, self.f_bavail = real(path).f_frsize, 1

    monkeypatch.setattr(files_module.os, "statvfs", Full)
    with pytest.raises(BankFileError, match="GB free, the bank needs"):
        make("mmap", folder=str(tmp_path / "bank"))


def _hold_lock(processes, folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a live run does (model/folder_lock.py), until it is killed."""
    code = ("import signal, sys; sys.path.insert(0, sys.argv[2]); from model.folder_lock import lock_folder; "
            "lock_folder(sys.argv[1], 'x', RuntimeError); print('held', flush=True); signal.pause()")
    proc = processes.popen([sys.executable, "-c", code, str(folder), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_in_use_by_another_process_is_refused_in_one_line(processes, id_folder, tmp_path, capsys):
    """A second process on a live run's folder (e.g. a resume while it still trains) or on its bank folder would
    overwrite it: refused, naming the holder, before anything is written."""
    import train

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = _hold_lock(processes, run_dir)
    assert train.main([f"--data.path={id_folder}", f"--run.out_dir={tmp_path}", "--run.name=r",
                       "--run.resume=auto", "--model.arch=tiny", "--run.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run folder {run_dir} is in use by another process (pid {holder.pid}); wait for it "
                   f"to end or stop it (two processes on one folder would overwrite each other)"]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    other = _hold_lock(processes, bank_dir)
    with pytest.raises(BankFileError, match=f"bank folder {bank_dir} is in use by another process"):
        make("host", folder=str(bank_dir))
    other.kill()
    other.wait()  # the kernel drops the lock when the process is gone, not when the signal is sent
    assert make("host", folder=str(bank_dir)).rows.writer  # the lock went with the process


def test_a_host_bank_never_overwrites_an_mmap_bank(tmp_path):
    folder = str(tmp_path / "mm")
    bank = make("mmap", folder=folder)
    train(bank, 0, 10)
    bank.checkpoint(10)
    before = (tmp_path / "mm" / "weight.bin").read_bytes()
    with pytest.raises(BankFileError, match="holds a memory-mapped bank"):
        make("host", folder=folder)
    assert (tmp_path / "mm" / "weight.bin").read_bytes() == before
