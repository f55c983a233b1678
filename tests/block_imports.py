"""Run a module as the GPU machine would, with some packages missing (it has no DALI and no FFCV).

    python tests/block_imports.py ffcv,nvidia.dali -m benchmarks.bench_loader --backends torch,ffcv ...

A meta-path finder makes `import ffcv` (and its submodules) raise ModuleNotFoundError, whatever is installed here,
so optional-backend handling is tested on this machine for real.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys
from pathlib import Path


class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: list[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: the GPU machine has none)",
                                      name=fullname)
        return None


def main() -> None:
    blocked, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: block_imports.py PKG[,PKG] -m MODULE [ARGS...]")
    sys.meta_path.insert(0, Blocker(blocked.split(",")))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
