"""`make bench`: the CPU benchmark set; JSON records under benchmarks/results/. On 2 cores (2026-11-28) the loader
benchmark took ~7 min and end to end ~2.5 min; the step and classifier benchmarks take a few minutes more.

Each benchmark runs in its own process, so thread settings and worker threads of one (FFCV, DALI, the classifier
benchmark's single thread) cannot slow the next. Absolute numbers on a 2-core CPU say little about a GPU; the
ratios measured side by side in one run do.
"""

from __future__ import annotations

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
    ["benchmarks.bench_bank"],  # small N (1e5, 1e6); the issue-17 table: see its module doc
]


def main() -> int:
    # the project's reference records: benchmarks/results/ (a user's run of one benchmark writes under --out)
    with ProcessTree() as tree:  # a benchmark stopped midway (Ctrl-C) leaves no worker of its behind
        failed = [r[0] for r in RUNS if tree.run([sys.executable, "-m", *r, "--out", str(RESULTS_DIR)]).returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
