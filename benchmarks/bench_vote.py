"""What agreeing on stop and save costs per step under torchrun: TrainStep.vote, a gloo all-reduce of 2 integers on
the host (waited in slices, so that signals are handled meanwhile), on 2 gloo ranks of this CPU. Measured side by
side in one run: the vote alone, the training step alone, and the step after its vote as train.py runs them.

    python -m benchmarks.bench_vote                       # table + benchmarks/results/bench_vote-<host>-<stamp>.json
    python -m benchmarks.bench_vote --arch resnet18 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Recorder, bench_parser, print_table  # noqa: E402
from benchmarks.process_tree import ProcessTree, free_port  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, "python -m benchmarks.bench_vote")
    p.add_argument("--arch", default="tiny", help="backbone (model.arch)")
    p.add_argument("--size", type=int, default=16, help="image side")
    p.add_argument("--batch", type=int, default=16, help="global batch (half per rank)")
    p.add_argument("--iters", type=int, default=100, help="calls per repeat")
    p.add_argument("--repeats", type=int, default=7, help="repeats (the median is reported)")
    return p.parse_args(argv)


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch

    torch.set_num_threads(1)
    from config import Config, apply_overrides
    from model import distributed as dist
    from model.optim import lr_table
    from model.trainer import build_trainer

    device = dist.init("cpu")
    small = {"head_hidden": 32, "dim": 16} if args.arch == "tiny" else {}  # the tests' tiny model
    cfg = apply_overrides(Config(), {"data": {"batch_size": args.batch},
                                     "model": {"arch": args.arch, "amp": "off", "channels_last": False, **small},
                                     "pic": {"negatives": "recent", "k": 256}})
    n = 4096
    calls = 3 * (5 + args.repeats * args.iters)
    trainer = build_trainer(cfg, n, device, lrs=lr_table(0.1, 10, calls + 1, 1e-6))
    g = torch.Generator().manual_seed(rank)
    b = args.batch // 2
    images = torch.randn(b, 3, args.size, args.size, generator=g)
    state = {"step": 0}

    def vote():
        trainer.train_step.vote(0, False)

    def step():
        s = state["step"]
        ids = torch.randint(0, n, (b,), generator=g)
        trainer.train_step(images, ids, (), s, float(trainer.lrs[s]))
        state["step"] += 1

    def vote_and_step():
        vote()
        step()

    variants = {"vote": vote, "step": step, "vote_and_step": vote_and_step}
    for fn in variants.values():
        for _ in range(5):  # warm-up
            fn()
    timings = {name: [] for name in variants}
    for r in range(args.repeats):  # interleaved, in a rotating order: a change of load hits every variant alike
        names = list(variants)[r % 3:] + list(variants)[:r % 3]
        for name in names:
            dist.barrier()  # both ranks start each block together
            t = time.perf_counter()
            for _ in range(args.iters):
                variants[name]()
            timings[name].append((time.perf_counter() - t) / args.iters)
    Path(out, f"rank{rank}.json").write_text(json.dumps(timings))
    trainer.train_step.release()
    dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as out, ProcessTree() as tree:
        port = free_port()
        ranks = [tree.spawn(_rank, (r, port, args, out)) for r in range(2)]
        for p in ranks:
            p.join()
        if any(p.exitcode for p in ranks):
            print(f"error: a rank failed (exit codes {[p.exitcode for p in ranks]})", file=sys.stderr)
            return 1
        timings = json.loads(Path(out, "rank0.json").read_text())
    med = {k: statistics.median(v) for k, v in timings.items()}
    rows = [{"measured": k, "us_per_step": 1e6 * med[k], "share_of_step_pct": 100 * med[k] / med["step"],
             "repeats_us": [1e6 * x for x in timings[k]]} for k in ("vote", "step", "vote_and_step")]
    rows.append({"measured": "vote_and_step - step", "us_per_step": 1e6 * (med["vote_and_step"] - med["step"]),
                 "share_of_step_pct": 100 * (med["vote_and_step"] - med["step"]) / med["step"]})
    print_table(f"TrainStep.vote on 2 gloo ranks ({args.arch}, batch {args.batch} @{args.size}px, rank 0)",
                ["measured", "us_per_step", "share_of_step_pct"], rows,
                caption=f"median over {args.repeats} repeats of {args.iters} calls each; share: of the step alone")
    return Recorder("bench_vote", args).final(rows)


if __name__ == "__main__":
    sys.exit(main())
