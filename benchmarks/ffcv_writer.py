"""FFCV's own writer as a command: what ffcv-imagenet's `write_imagenet.py` does (torchvision `ImageFolder` into
`DatasetWriter` with `RGBImageField(write_mode="proportion", compress_probability=0.5, max_resolution=R,
jpeg_quality=90)` and an `IntField` label, chunk size 100), the reference bench_convert times as a whole process.

    python -m benchmarks.ffcv_writer SRC OUT.beton [--max-resolution 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys


def write(src: str, out: str, max_res: int, workers: int) -> int:
    """ffcv-imagenet's writer recipe. Returns the number of samples written."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    data = ImageFolder(src)
    writer = DatasetWriter(out, {
        "image": RGBImageField(write_mode="proportion", max_resolution=max_res, compress_probability=0.5,
                               jpeg_quality=90),
        "label": IntField(),
    }, num_workers=workers)
    writer.from_indexed_dataset(data, chunksize=100)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ffcv_writer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("src", help="ImageNet-layout folder")
    ap.add_argument("out", help="output .beton")
    ap.add_argument("--max-resolution", type=int, default=256, help="longest side stored, px")
    ap.add_argument("--workers", type=int, default=2, help="writer processes")
    a = ap.parse_args(argv)
    write(a.src, a.out, a.max_resolution, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
