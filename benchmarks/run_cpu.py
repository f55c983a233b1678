"""`make bench`: the CPU benchmark set (about 10-15 minutes on 2 cores); JSON records under benchmarks/results/.

Absolute numbers on a 2-core CPU say little about a GPU; the ratios measured side by side in one run do.
"""

from __future__ import annotations

import sys

from benchmarks import bench_classifier, bench_e2e, bench_loader, bench_step


def main() -> int:
    bench_loader.main(["--backends", "torch,torch-gpu,ffcv,dali", "--modes", "crop,full", "--size", "224"])
    bench_step.main(["--archs", "resnet18", "--sizes", "64", "--batches", "32", "--num-instances", "100000",
                     "--negatives", "recent", "--k", "4096"])
    bench_e2e.main(["--backends", "torch,torch-gpu,dali,ffcv", "--arch", "resnet18", "--size", "64"])
    bench_classifier.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
