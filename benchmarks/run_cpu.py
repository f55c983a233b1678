"""`make bench`: the CPU benchmark set; JSON records under benchmarks/results/. How long each takes on a 2-core
machine: docs/results.md.

Each benchmark runs in its own process, so thread settings and worker threads of one (FFCV, DALI, the classifier
benchmark's single thread) cannot slow the next. Absolute numbers on a 2-core CPU say little about a GPU; the
ratios measured side by side in one run do.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import RESULTS_DIR
from benchmarks.process_tree import ProcessTree

RUNS = [
    ["benchmarks.bench_loader", "--backends", "torch,torch-gpu,ffcv,dali", "--modes", "crop,full", "--size", "224",
     "--ffcv-write-mode", "proportion", "--dali-cpu-resize", "numba", "--repeats", "5"],
    ["benchmarks.bench_convert", "--images", "2048", "--max-res", "256,512", "--repeats", "3"],
    ["benchmarks.bench_step", "--archs", "resnet18", "--sizes", "64", "--batches", "32", "--num-instances", "100000",
     "--negatives", "recent", "--k", "4096", "--repeats", "7", "--iters", "3"],
    ["benchmarks.bench_e2e", "--backends", "torch,torch-gpu,dali,ffcv", "--arch", "resnet18", "--size", "64"],
    ["benchmarks.bench_classifier"],
    ["benchmarks.bench_bank"],  # small N (1e5, 1e6); the large-N table: see its module doc
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run_cpu",
        description="The CPU benchmark set (make bench), one process per benchmark; records under "
                    f"{RESULTS_DIR}. Each benchmark alone, with its own flags: python -m benchmarks.NAME --help.",
        epilog="benchmarks: " + ", ".join(r[0].split(".")[1] for r in RUNS))
    ap.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")
    args = ap.parse_args(argv)
    runs = RUNS
    if args.only:
        names = {r[0].split(".")[1]: r for r in RUNS}
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            ap.exit(2, f"error: unknown benchmark {unknown[0]!r}; benchmarks: {', '.join(names)}\n")
        runs = [names[n] for n in args.only.split(",")]
    # the project's reference records: benchmarks/results/ (a user's run of one benchmark writes under --out)
    with ProcessTree() as tree:  # a benchmark stopped midway (Ctrl-C) leaves no worker of its behind
        failed = [r[0] for r in runs if tree.run([sys.executable, "-m", *r, "--out", str(RESULTS_DIR)]).returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
