"""Console commands: `pic-train ARGS` is `python train.py ARGS`, `pic-convert ARGS` is
`python -m pipeline.convert_ffcv ARGS`, and so on (`COMMANDS`), run from any directory.

They run the checkout this package was installed from with `pip install -e CHECKOUT`: the checkout is put first
on this process's path and on PYTHONPATH, so that processes the job starts (a benchmark's child processes) import
the same code. A non-editable install has no checkout beside it and says so in one `error:` line (exit 2).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# command -> (module run as __main__, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "pic-train": ("train", "pre-train PIC on a folder, a file list or a .beton (python train.py)"),
    "pic-convert": ("pipeline.convert_ffcv", "convert an image folder to an FFCV .beton"),
    "pic-knn": ("eval.knn", "weighted kNN top-1 of a checkpoint"),
    "pic-linear": ("eval.linear", "linear probe of a checkpoint"),
    "pic-report": ("eval.report", "a run's report (PNG + HTML), or two runs compared"),
    "pic-plot": ("eval.plot", "a run's training curves"),
    "pic-sample-data": ("pipeline.sample_data", "a small real-image folder to try things on"),
    "pic-tune": ("benchmarks.tune", "which backend and workers feed your model on your data"),
    "pic-bench": ("benchmarks.run_cpu", "the CPU benchmark set (make bench)"),
}


def checkout() -> Path:
    """The repository root this package lives in (an editable install points here)."""
    return Path(__file__).resolve().parents[1]


def run(command: str, argv: list[str] | None = None) -> None:
    module, _ = COMMANDS[command]
    root = checkout()
    if not (root / "train.py").is_file() or not (root / "pipeline").is_dir():
        print(f"error: {command} runs the checkout it was installed from, and {root} is not one: install with "
              f"`pip install -e PATH_TO_CHECKOUT`", file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    sys.argv = [command, *(sys.argv[1:] if argv is None else argv)]
    if module == "train":  # a script, not a package module: run it as `python train.py` would
        runpy.run_path(str(root / "train.py"), run_name="__main__")
    else:
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _entry(command: str):
    def main() -> None:
        run(command)
    main.__name__ = command.replace("-", "_")
    return main


train = _entry("pic-train")
convert = _entry("pic-convert")
knn = _entry("pic-knn")
linear = _entry("pic-linear")
report = _entry("pic-report")
plot = _entry("pic-plot")
sample_data = _entry("pic-sample-data")
tune = _entry("pic-tune")
bench = _entry("pic-bench")
