#!/usr/bin/env bash
# Check a GPU-suite output folder: every record there, parseable, with rows; within the limits a lent machine can
# send back (at most 8 files, each under 16 MiB). Used by tools/gpu_stack_check.sh after a SMOKE run.
#   bash benchmarks/check_suite.sh OUT_DIR
set -euo pipefail
OUT=$1
PY=${PYTHON:-python3}
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
files = sorted(p for p in out.rglob("*") if p.is_file())
problems = []
if len(files) > 8:
    problems.append(f"{len(files)} files (> 8)")
for p in files:
    if p.stat().st_size > 16 << 20:
        problems.append(f"{p.name}: {p.stat().st_size} bytes (> 16 MiB)")
expected = {"suite.log", "step.json", "classifier.json"}
names = {p.name for p in files}
problems += [f"missing {n}" for n in sorted(expected - names)]
for pre in ("loader-", "e2e-"):
    if not any(n.startswith(pre) for n in names):
        problems.append(f"missing {pre}*.json")
for p in files:
    if p.suffix != ".json":
        continue
    rec = json.loads(p.read_text())
    rows = rec.get("rows") or []
    measured = [r for r in rows if "skipped" not in r]
    if not measured:
        problems.append(f"{p.name}: no measured row")
    if rec.get("partial"):
        problems.append(f"{p.name}: partial record (the benchmark did not finish)")
    print(f"{p.name}: {len(measured)} measured, {len(rows) - len(measured)} skipped")
log = (out / "suite.log").read_text() if (out / "suite.log").exists() else ""
problems += [line for line in log.splitlines() if line.startswith("!! ")]
if problems:
    sys.exit("check_suite: " + "; ".join(problems))
print(f"check_suite: {len(files)} files, all records complete")
PY
