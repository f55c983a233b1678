"""End-to-end training throughput: the real loop (train.py) for a few steps per backend; img/s and data-wait %.

    python -m benchmarks.bench_e2e [--data DIR] [--backends torch,torch-gpu,dali,ffcv] [--arch resnet18]
                                   [--size 64] [--batch 32] [--steps 20] [--warmup 4] [--out DIR]

Each backend trains the same model from the same initialisation on the same images; the first `--warmup` steps
(worker start-up, numba / cudnn warm-up) are excluded. `step_only_img_s` is the same step on a synthetic batch
already on the device, measured in the same run: e2e / step-only is the fraction of the model's speed the data
path delivers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SCRATCH, Recorder, add_loader_args, bench_parser, image_folder, print_table, time_fn
from benchmarks.process_tree import ProcessTree
from config import Config, apply_overrides, to_dict
from model.distributed import pick_device
from model.trainer import build_trainer
from pipeline import BackendUnavailable, backend_unavailable

ROOT = Path(__file__).resolve().parents[1]


def run_backend(backend: str, data: str, args, out_dir: str) -> dict:
    cfg = Config()
    apply_overrides(cfg, {
        "data": {"path": data, "backend": backend, "batch_size": args.batch, "workers": args.workers,
                 "image_size": args.size, "color_aug_on": "device" if backend == "torch" else "worker"},
        "model": {"arch": args.arch, "compile": args.compile},
        "pic": {"negatives": "recent", "k": args.k},
        "optim": {"epochs": 1000},
        # the loop's real logging cadence: a log step reads the loss back (the one host sync), so logging every
        # step would measure a loop that waits for the GPU every step
        "run": {"out_dir": out_dir, "name": backend, "log_every": args.log_every,
                "max_steps": _round_up(args.warmup, args.log_every) + _round_up(args.steps, args.log_every),
                "eval": "none", "monitor_every": 0, "ckpt_minutes": 0},  # no monitor point: not the loop's time
    })
    config = Path(out_dir) / f"{backend}.json"
    config.write_text(json.dumps(to_dict(cfg)))
    t = time.perf_counter()
    # the training loop as users run it (train.py, its own process); the log says what it did
    with ProcessTree() as tree:
        run = tree.run([sys.executable, str(ROOT / "train.py"), f"--config={config}"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if run.returncode != 0:
        raise RuntimeError(f"train.py failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
    log = [json.loads(x) for x in (Path(out_dir) / backend / "log.jsonl").read_text().splitlines()]
    # one record per log window of `log_every` steps; the windows inside the warm-up are dropped
    timed = [r for r in log if "event" not in r][_round_up(args.warmup, args.log_every) // args.log_every:]
    return {"backend": backend, "e2e_img_s": statistics.median(r["img_s"] for r in timed),
            "data_wait_pct": statistics.mean(r["data_wait_pct"] for r in timed),
            "steps": len(timed) * args.log_every, "wall_seconds": wall}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def step_only(args, device: torch.device, n: int) -> float:
    from model.optim import lr_table

    lrs = lr_table(0.03, 0, 4 * args.steps + 1, 1e-6)  # 1 warm-up + 3 timed blocks
    cfg = apply_overrides(Config(), {"data": {"batch_size": args.batch},
                                     "model": {"arch": args.arch, "compile": args.compile},
                                     "pic": {"negatives": "recent", "k": args.k}})
    step = build_trainer(cfg, n, device, lrs=lrs).train_step  # the same model, optimizer and step as train.py's
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    counter = [0]

    def one():
        s = counter[0]
        step(x, (torch.arange(args.batch, device=device) + s * args.batch) % n, (), s, float(lrs[s]))
        counter[0] += 1

    def block():  # `steps` steps queued back to back, one sync at the end: the loop's own rhythm (no per-step sync)
        for _ in range(args.steps):
            one()

    t = time_fn(block, warmup=1, repeats=3)
    return args.batch * args.steps / t["median"]


def _measure_one(backend: str, data: Path, n: int, args, device: torch.device) -> dict:
    if backend == "__step__":
        return {"step_only_img_s": step_only(args, device, n)}
    path = str(data)
    missing = backend_unavailable(backend)
    if missing:
        return {"backend": backend, "skipped": missing}
    try:
        if backend == "ffcv":
            from pipeline.convert_ffcv import ConvertSettings, convert

            beton = SCRATCH / f"{data.name}-{n}-256px.beton"
            if not beton.exists():
                convert(str(data), str(beton), ConvertSettings(max_resolution=256, write_mode="jpg",
                                                               jpeg_quality=90, workers=args.workers))
            path = str(beton)
        with tempfile.TemporaryDirectory() as out_dir:
            return run_backend(backend, path, args, out_dir)
    except (BackendUnavailable, ImportError) as e:
        return {"backend": backend, "skipped": str(e)}
    except RuntimeError as e:  # train.py failed: reported as such, not as a missing backend
        return {"backend": backend, "skipped": f"FAILED: {e}"}


def _subprocess(argv: list[str] | None, one: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", *(sys.argv[1:] if argv is None else argv), "--one", one]
    with ProcessTree() as tree:
        out = tree.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"backend": one, "skipped": f"failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}


def build_parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "python -m benchmarks.bench_e2e")
    ap.add_argument("--backends", default="torch,torch-gpu,dali,ffcv", help="backends, comma-separated (ffcv: the "
                                                                           "folder is converted first)")
    ap.add_argument("--arch", default="resnet18", help="backbone (model.arch)")
    add_loader_args(ap, size=64, batch=32)
    ap.add_argument("--k", type=int, default=4096, help="pic.k: recent negatives")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (rounded up to whole log windows)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps (rounded up to whole log windows)")
    ap.add_argument("--log-every", type=int, default=10,
                    help="the loop's log cadence (train.py's default); steps are timed per log window")
    ap.add_argument("--compile", action="store_true", help="model.compile")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure one backend, print JSON
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = Recorder("bench_e2e", args)
    device = pick_device("auto")
    data = image_folder(args)
    from pipeline.dataset import load_index

    n = len(load_index(data))
    if args.one:
        print("RESULT " + json.dumps(_measure_one(args.one, data, n, args, device)), flush=True)
        return 0
    rows = []
    # Every measurement runs in a fresh process: DALI / FFCV worker threads of one backend must not steal the
    # cores of the next one (seen on 2 cores: a later run slowed by an earlier backend's lingering threads).
    step = _subprocess(argv, "__step__")
    step_ips = step.get("step_only_img_s")  # None when that measurement failed: the e2e rows still count
    extra = {"device": str(device), "step_only_img_s": step_ips, "num_images": n,
             "negatives": "recent" if args.k < n else "full (K >= N)"}
    if step_ips is None:
        extra["step_only_error"] = step.get("skipped")
        print(f"step-only measurement failed: {step.get('skipped')}", flush=True)
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        missing = backend_unavailable(backend)  # here, not in a child that needs seconds to start
        rows.append({"backend": backend, "skipped": missing} if missing else _subprocess(argv, backend))
        print(rows[-1], flush=True)
        record.partial(rows, extra)
    for r in rows:
        if "e2e_img_s" in r and step_ips:
            r["step_only_img_s"] = step_ips
            r["e2e_vs_step"] = r["e2e_img_s"] / step_ips
    print_table(f"end-to-end training, {args.arch} @{args.size}px, batch {args.batch}, {device}",
                ["backend", "e2e_img_s", "step_only_img_s", "e2e_vs_step", "data_wait_pct", "skipped"], rows)
    return record.final(rows, extra)


if __name__ == "__main__":
    sys.exit(main())
