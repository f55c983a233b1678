#!/usr/bin/env bash
# Rehearse the GPU machine's software stack on this CPU machine (not part of CI).
#
# The lent GPU machine has Python 3.12, torch 2.11 / torchvision 0.26, numpy 2.5 and a few preinstalled packages,
# and no DALI, no FFCV, no package index. This builds a second environment like it (.venv-gpustack, CPU only:
# PyPI's torch 2.11 wheel runs on the CPU here), then runs the test suite and the GPU suite's SMOKE mode in it, so
# that a missing optional backend, an API that moved between torch 2.11 and 2.14, or a Python 3.12 difference shows
# up here and not in the 15 lent minutes. Both parts always run and are reported; the script exits non-zero when
# either failed. The suite includes tests/test_lifecycle.py, whose torchrun job runs to its end PIC_TORCHRUN_ROUNDS
# times (default 5) beside busy loops: the torch 2.11 teardown deadlock it guards against needs load to show.
#
#   bash tools/gpu_stack_check.sh            # build (first time: a few minutes, ~6 GB) and run both
#   PY312=/path/to/python3.12 bash tools/gpu_stack_check.sh
#   PYTEST_ARGS="tests/test_lifecycle.py" bash tools/gpu_stack_check.sh    # a part of the suite only
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpustack
# pyenv's python3.12 shim fails unless 3.12 is selected: prefer the interpreter itself
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1 || true)}
PY312=${PY312:-$(command -v python3.12 || true)}
"$PY312" --version >/dev/null 2>&1 && [ -n "$PY312" ] || { echo "gpu_stack_check: needs python3.12 (set PY312=...)"; exit 2; }
t0=$(date +%s)
if [ ! -f "$VENV/.ready" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV" || exit 2
  # What the GPU machine has preinstalled (its README), plus pytest and pyyaml to run the tests. No DALI, no FFCV.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
      "torch==2.11.0" "torchvision==0.26.0" "numpy>=2.5,<2.6" numba rich pillow matplotlib scikit-learn \
      scikit-image pytest pytest-timeout pyyaml || { echo "gpu-stack: pip install failed"; exit 2; }
  touch "$VENV/.ready"
fi
"$VENV/bin/python" - <<'PY'
import sys, torch, torchvision, numpy
print("gpu-stack:", "python", sys.version.split()[0], "torch", torch.__version__, "torchvision",
      torchvision.__version__, "numpy", numpy.__version__)
for mod in ("nvidia.dali", "ffcv"):
    try:
        __import__(mod)
        sys.exit(f"gpu-stack: {mod} is importable here, but the GPU machine has none: remove it from {sys.prefix}")
    except ImportError:
        pass
PY
[ $? = 0 ] || exit 2
t1=$(date +%s)
echo "gpu-stack: environment ready in $((t1 - t0)) s"
# The whole suite, as the GPU machine would run it (DALI/FFCV tests must skip, not fail or error).
# shellcheck disable=SC2086  # PYTEST_ARGS: several words
PYTHONPATH=. "$VENV/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-}
tests_rc=$?
t2=$(date +%s)
echo "gpu-stack: tests $([ $tests_rc = 0 ] && echo passed || echo "FAILED (pytest exit $tests_rc)") in $((t2 - t1)) s"
out=$(mktemp -d)
PYTHON="$PWD/$VENV/bin/python" SMOKE=1 bash benchmarks/gpu_suite.sh "$out"
PYTHON="$PWD/$VENV/bin/python" bash benchmarks/check_suite.sh "$out"
smoke_rc=$?
t3=$(date +%s)
echo "gpu-stack: SMOKE suite $([ $smoke_rc = 0 ] && echo passed || echo FAILED) in $((t3 - t2)) s; records in $out"
if [ $tests_rc = 0 ] && [ $smoke_rc = 0 ]; then
  echo "gpu-stack: all green in $((t3 - t0)) s"
  exit 0
fi
echo "gpu-stack: NOT green: tests $([ $tests_rc = 0 ] && echo passed || echo FAILED), SMOKE suite" \
     "$([ $smoke_rc = 0 ] && echo passed || echo FAILED)"
exit 1
