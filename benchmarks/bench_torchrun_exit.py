"""Does a 2-rank torchrun job that trained to its end exit? ROUNDS jobs of the tiny model (gloo, recent negatives, a
checkpoint every step) run one after another beside a busy loop on every core; a round that has not exited
after BOUND seconds counts as hung and is killed with its ranks. The teardown deadlock this looks for (torch 2.11:
model/distributed.py, `shutdown`) needs load to show. Table + JSON record (hangs per rounds, seconds per round).

    python -m benchmarks.bench_torchrun_exit --rounds 6          # the interpreter running it is the stack tested
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.process_tree import ProcessTree, free_port  # noqa: E402

STEPS = 4  # per job: 2 epochs of 2 steps (32 images, 2 ranks, batch 16)


def job_command(data: Path, out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={name}", str(ROOT / "train.py"),
            f"--data.path={data}", "--data.backend=memory", "--data.workers=0", "--data.image_size=16",
            "--data.batch_size=16", "--model.arch=tiny", "--model.head_hidden=32", "--model.dim=16",
            "--pic.negatives=recent", "--pic.k=16", "--optim.epochs=2", "--optim.warmup_epochs=1", "--run.eval=none",
            "--run.monitor_every=0", "--run.ckpt_every=1", "--run.threads=1", "--run.device=cpu",
            f"--run.out_dir={out}", f"--run.name={name}"]


def run_rounds(data: Path, out: Path, rounds: int, bound_s: float, hogs: ProcessTree) -> list[dict]:
    """Run the job `rounds` times beside one busy loop per core (started in `hogs`, which the caller ends);
    one row per round: exit code (None: hung, killed after bound_s) and seconds. Output in out/round<i>.log."""
    for _ in range(os.cpu_count() or 1):
        hogs.popen([sys.executable, "-c", "while True: pass"])
    rows = []
    for r in range(rounds):
        with ProcessTree() as job:  # a hung round is killed here, with its ranks
            t = time.monotonic()
            with open(out / f"round{r}.log", "w") as log:
                proc = job.popen(job_command(data, out, f"round{r}"), stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
            try:
                code = proc.wait(timeout=bound_s)
            except subprocess.TimeoutExpired:
                code = None
            rows.append({"round": r, "exit_code": code, "seconds": round(time.monotonic() - t, 1)})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.common import bench_parser

    p = bench_parser(__doc__, "python -m benchmarks.bench_torchrun_exit")
    p.add_argument("--rounds", type=int, default=6, help="jobs run one after the other")
    p.add_argument("--bound", type=float, default=240.0, help="seconds after which a round counts as hung")
    p.add_argument("--tag", default="", help="a word for the record's name (e.g. before, after)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.common import Recorder, print_table
    from pipeline.sample_data import make_photos

    with tempfile.TemporaryDirectory() as tmp, ProcessTree() as hogs:
        data = make_photos(tmp, count=32)
        rows = run_rounds(data, Path(tmp), args.rounds, args.bound, hogs)
    hangs = sum(r["exit_code"] is None for r in rows)
    failed = sum(r["exit_code"] not in (0, None) for r in rows)
    import torch

    print_table(f"2-rank torchrun jobs to their end beside {os.cpu_count()} busy loops (torch {torch.__version__})",
                ["round", "exit_code", "seconds"], [{**r, "exit_code": "hung" if r["exit_code"] is None else
                                                     r["exit_code"]} for r in rows],
                caption=f"{hangs} hung and {failed} failed of {args.rounds} rounds (hung: not exited after "
                        f"{args.bound:.0f} s)")
    record = Recorder("bench_torchrun_exit" + (f"-{args.tag}" if args.tag else ""), args)
    record.final(rows, {"hangs": hangs, "failed": failed, "rounds": args.rounds})
    return 0 if hangs == failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
