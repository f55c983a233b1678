"""Draw a run's curves from its log.jsonl: loss, learning rate, images/s and data-wait % over steps.

    python -m eval.plot runs/NAME [--out runs/NAME/curves.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = Path(args.run_dir) / "log.jsonl"
    if not log.is_file():
        print(f"error: no log.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    rows = [r for r in map(json.loads, log.read_text().splitlines()) if "event" not in r]
    steps = [r["step"] for r in rows]  # steps done (run_log.py)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    panels = [("loss", "loss"), ("lr", "learning rate"), ("img_s", "images / s"), ("data_wait_pct", "data wait %")]
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        ax.plot(steps, [math.nan if r[key] is None else r[key] for r in rows], lw=1.2)  # None: non-finite
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{Path(args.run_dir).name}: {len(rows)} logged steps")
    fig.tight_layout()
    out = Path(args.out or Path(args.run_dir) / "curves.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
