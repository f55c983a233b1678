"""The life of a multi-process run, on 2 gloo ranks: a stop that all ranks agree on (SIGTERM while one rank waits for
its loader), a second signal that leaves alone at once and says so, and a finished job that exits, every time, with
a CPU hog beside it.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment; train.py
reads nothing else), so that each one's exit code and output are the test's to check; the last test runs torchrun
itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HOOKED_TRAIN, ROOT, free_port, rank_env, tiny_config, wait_until, write_id_folder

from benchmarks.bench_torchrun_exit import STEPS, run_rounds
from config import replace, to_dict
from lifecycle import StopFlag

pytestmark = pytest.mark.slow

PROMPTLY_S = 30  # a rank's exit after the signal: a bound for a loaded 2-core machine (the stop itself takes ms)
STEPS_PER_UNIT, UNITS = 6, 4  # 48 images, 2 ranks of 4: 6 steps per epoch


def start_ranks(processes, cfg, tmp_path: Path, tag: str, **env) -> list[subprocess.Popen]:
    """Both ranks of `cfg` with the test hooks (tests/hooked_train.py); output in tmp_path/<tag><rank>.log."""
    config = tmp_path / f"{tag}.json"
    config.write_text(json.dumps(to_dict(cfg)))
    port, ranks = free_port(), []
    for r in range(2):
        with open(tmp_path / f"{tag}{r}.log", "w") as log:
            ranks.append(processes.popen([sys.executable, str(HOOKED_TRAIN), f"--config={config}"], stdout=log,
                                         stderr=subprocess.STDOUT, env=rank_env(r, 2, port, **env)))
    return ranks


def output(tmp_path: Path, tag: str, rank: int) -> str:
    f = tmp_path / f"{tag}{rank}.log"
    return f.read_text() if f.exists() else ""


def exit_promptly(proc: subprocess.Popen, what: str) -> int:
    try:
        return proc.wait(timeout=PROMPTLY_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not exit within {PROMPTLY_S} s of its signal") from None


def job_config(folder: Path, out: Path, **pic):
    return tiny_config(str(folder), str(out), data={"backend": "torch", "batch_size": 8, "workers": 0},
                       optim={"epochs": UNITS, "warmup_epochs": 1}, pic=pic, run={"name": "job", "threads": 1})


def _votes(rank: int, port: int, out: str) -> None:
    """Rank `rank` votes three times; what it learns is saved for the test."""
    os.environ.update(rank_env(rank, 2, port))
    sys.path.insert(0, str(ROOT))
    from model import distributed as dist
    from model.trainer import build_trainer

    trainer = build_trainer(tiny_config("", out), 64, dist.init("cpu"))
    mine = {0: [(0, False), (0, False), (0, False)], 1: [(0, False), (0, True), (signal.SIGTERM, False)]}[rank]
    learnt = []
    for stop_signal, save in mine:
        stop = trainer.train_step.vote(stop_signal, save)
        learnt.append((stop, trainer.train_step.stop_signal, trainer.train_step.save_requested))
    Path(out, f"votes{rank}.json").write_text(json.dumps(learnt))
    trainer.train_step.release()
    dist.shutdown()


def test_every_rank_learns_any_ranks_stop_signal_and_due_checkpoint(processes, tmp_path):
    """Rank 1's checkpoint timer is due, then it gets a SIGTERM: rank 0 learns both at the same votes, so both save
    and stop before the same steps (a save stays requested until the checkpoint is written)."""
    port = free_port()
    ranks = [processes.spawn(_votes, (r, port, str(tmp_path))) for r in (0, 1)]
    for proc in ranks:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in ranks] == [0, 0]
    learnt = [json.loads((tmp_path / f"votes{r}.json").read_text()) for r in (0, 1)]
    assert learnt[0] == learnt[1] == [[False, 0, False], [False, 0, True], [True, signal.SIGTERM, True]]


@pytest.mark.timeout(600)
def test_sigterm_to_both_ranks_while_one_waits_for_its_loader_stops_them_at_one_step_saved(processes, tmp_path):
    """The usual state of a data-bound job when a preemption lands: rank 1 waits for its loader, rank 0 already
    waits for rank 1. Rank 1 stops waiting and votes to stop without a batch; both stop before the same step,
    rank 0 saves it, both exit with the signal's code, and a resume continues from there to the end."""
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)
    cfg = job_config(folder, tmp_path)
    mark = tmp_path / "blocked"
    # rank 1's 13th decode blocks: 4 images per step, so it waits for the batch of step 3
    ranks = start_ranks(processes, cfg, tmp_path, "stop", BLOCK_RANK="1", BLOCK_AFTER="13", BLOCKED_MARK=str(mark))
    wait_until(mark.exists, "rank 1 blocked in its loader", ranks)
    for proc in ranks:
        proc.send_signal(signal.SIGTERM)
    codes = [exit_promptly(proc, f"rank {r}") for r, proc in enumerate(ranks)]
    logs = [output(tmp_path, "stop", r) for r in (0, 1)]
    assert codes == [128 + signal.SIGTERM] * 2, logs
    assert "SIGTERM: checkpoint saved at step 3" in logs[0] and "--run.resume=auto" in logs[0], logs[0]
    assert "Traceback" not in logs[0] + logs[1], logs
    run = tmp_path / "job"
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == 3
    resumed = start_ranks(processes, replace(cfg, run={"resume": "auto"}), tmp_path, "resume")
    assert [proc.wait(timeout=300) for proc in resumed] == [0, 0], [output(tmp_path, "resume", r) for r in (0, 1)]
    assert "resumed from" in output(tmp_path, "resume", 0) and "at step 3" in output(tmp_path, "resume", 0)
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == STEPS_PER_UNIT * UNITS
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines() if '"event"' not in x]
    assert steps == list(range(1, STEPS_PER_UNIT * UNITS + 1))  # steps done: 1-3 before the stop, 4-24 after


@pytest.mark.timeout(600)
def test_a_second_signal_leaves_alone_at_once_and_says_the_others_cannot_save(processes, tmp_path):
    """Rank 0 is stuck in its loader and gets no signal; rank 1 waits for it in the step's vote. A first SIGTERM to
    rank 1 only asks for an agreed stop, which cannot come; a second one makes it leave at once, alone, without
    entering any collective, saying that the others cannot save. Rank 0, signalled later, finds it gone and ends
    with an error instead of waiting, and removes its node's shared-memory bank."""
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)
    bank = tmp_path / "bank"
    cfg = job_config(folder, tmp_path, negatives="recent", k=16, bank_storage="host", bank_file=str(bank))
    mark = tmp_path / "blocked"
    ranks = start_ranks(processes, cfg, tmp_path, "alone", BLOCK_RANK="0", BLOCK_AFTER="13", BLOCKED_MARK=str(mark))
    wait_until(mark.exists, "rank 0 blocked in its loader", ranks)
    ranks[1].send_signal(signal.SIGTERM)
    wait_until(lambda: "rank 1: SIGTERM: stopping before the next step" in output(tmp_path, "alone", 1),
               "rank 1 taking the first signal", ranks)
    time.sleep(StopFlag.REPEAT_SECONDS + 0.5)  # sooner, it would count as the same signal delivered twice
    ranks[1].send_signal(signal.SIGTERM)
    assert exit_promptly(ranks[1], "rank 1") == 128 + signal.SIGTERM, output(tmp_path, "alone", 1)
    said = output(tmp_path, "alone", 1)
    assert "second SIGTERM: rank 1 leaves alone, without a checkpoint; the other ranks cannot save" in said, said
    assert ranks[0].poll() is None  # still stuck: nothing it could have noticed yet
    ranks[0].send_signal(signal.SIGTERM)
    assert exit_promptly(ranks[0], "rank 0") not in (0, 128 + signal.SIGTERM), output(tmp_path, "alone", 0)
    assert not (tmp_path / "job" / "last.pt").exists()  # nobody saved: the step-3 state was never agreed
    assert not bank.exists() or not any(bank.iterdir())  # rank 0, the node's writer, removed the bank's files


ROUNDS = int(os.environ.get("PIC_TORCHRUN_ROUNDS", "5"))
ROUND_BOUND_S = 240  # a round takes seconds; this only tells a hang from a machine under heavy load


@pytest.mark.timeout(ROUNDS * ROUND_BOUND_S + 120)
def test_a_finished_two_rank_torchrun_job_exits_every_time_beside_a_cpu_hog(processes, tmp_path):
    """Each of ROUNDS 2-rank torchrun jobs trains to its end and exits 0, with busy loops on every core. A rank
    whose teardown deadlocks (the gloo group destroyed from DDP's Reducer while a gloo worker waits for the GIL:
    model/distributed.py shutdown) finishes training and then never exits; load makes that window wide.
    `python -m benchmarks.bench_torchrun_exit` runs the same rounds and writes a record."""
    rows = run_rounds(write_id_folder(tmp_path / "d", n=32, classes=1), tmp_path, ROUNDS, ROUND_BOUND_S, processes)
    print(f"torchrun rounds: {rows}")  # pytest -s shows it
    failed = [r["round"] for r in rows if r["exit_code"] != 0]
    assert not failed, f"rounds: {rows}; round {failed[0]}'s output:\n" + \
        (tmp_path / f"round{failed[0]}.log").read_text()[-3000:]
    for r in range(ROUNDS):
        assert torch.load(tmp_path / f"round{r}" / "last.pt", weights_only=True)["progress"]["step"] == STEPS


def test_the_same_signal_twice_at_once_is_one_stop_and_later_it_leaves():
    """A scheduler that signals the whole job reaches each rank twice (directly, and through torchrun's forwarding):
    that repeat must not throw away the stop's checkpoint. A later second signal still leaves at once."""
    from lifecycle import LeftAlone, StopFlag

    with StopFlag() as stop:
        stop.repeat_seconds = 0.5  # torchrun's (a process torchrun did not start has none: tested below)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the forwarded copy, moments later
        assert stop.signum == signal.SIGTERM
        time.sleep(0.6)
        with pytest.raises(LeftAlone):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs between bytecodes


def test_without_torchrun_a_second_signal_leaves_however_soon(monkeypatch):
    from lifecycle import LeftAlone, StopFlag

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with StopFlag() as stop, pytest.raises(LeftAlone):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)


def test_a_second_signal_inside_the_checkpoint_write_leaves_no_partial_file(tmp_path):
    """torch.save turns an exception raised in it into its own RuntimeError (the signal's LeftAlone as the
    context): the run still recognises the second signal, and the temporary file is removed."""
    from lifecycle import LeftAlone, left_alone
    from model.checkpoint import atomic_save

    class Interrupted:
        def __reduce__(self):
            raise LeftAlone(signal.SIGTERM)

    (tmp_path / "last.pt").write_bytes(b"old")
    with pytest.raises(BaseException) as caught:
        atomic_save({"w": torch.zeros(1000), "x": Interrupted()}, tmp_path / "last.pt", keep_previous=True)
    assert left_alone(caught.value) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"] and (tmp_path / "last.pt").read_bytes() == b"old"
