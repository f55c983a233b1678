"""Training-step throughput on synthetic tensors (no data pipeline): PIC step vs a plain supervised step.

    python -m benchmarks.bench_step [--archs resnet18,resnet50] [--sizes 224,160] [--batches 256]
                                    [--num-instances 1281167] [--negatives recent] [--k 65536] [--out DIR]

Both steps use the same backbone, optimizer, AMP and channels_last settings (model/step.py). The supervised step is
backbone -> Linear(feat, 1000) -> cross-entropy; the PIC step adds the MLP head and the instance bank (full soft-max
or K recent negatives with the weight correction). The ratio is the cost of PIC's extra parts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Recorder, bench_parser, print_table, time_fn
from config import Config, apply_overrides
from model.backbone import make_backbone
from model.distributed import pick_device
from model.optim import lr_table, make_optimizer
from model.trainer import build_trainer


class Supervised(nn.Module):
    def __init__(self, arch: str, classes: int = 1000):
        super().__init__()
        self.backbone, dim = make_backbone(arch)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


def supervised_step(model, optimizer, device, amp: str, channels_last: bool):
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp != "off" else None

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if ctx is not None:
            with ctx:
                logits = model(x)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def bench_one(arch: str, size: int, batch: int, args, device: torch.device) -> dict:
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    n = args.num_instances
    lrs = lr_table(0.03, 0, pic_steps_run(args), 1e-6)

    sup = Supervised(arch).to(device)
    if args.channels_last:
        sup.to(memory_format=torch.channels_last)
    sup_opt = make_optimizer(sup.parameters(), 0.03, 0.9, 1e-4, device)
    sup_step = supervised_step(torch.compile(sup) if args.compile else sup, sup_opt, device, args.amp,
                               args.channels_last)

    cfg = apply_overrides(Config(), {
        "data": {"batch_size": batch}, "model": {"arch": arch, "amp": args.amp, "channels_last": args.channels_last,
                                                 "compile": args.compile},
        "pic": {"negatives": args.negatives, "k": args.k}})
    pic_step = build_trainer(cfg, n, device, lrs=lrs).train_step
    # ids follow a sliding stream so the recent-negative set fills like in training
    counter = {"step": 0}

    def run_pic():
        s = counter["step"]
        ids = (torch.arange(batch, device=device) + s * batch) % n
        pic_step(x, ids, (), s, float(lrs[s]))
        counter["step"] += 1

    def run_sup():
        sup_step(x, labels)

    def many(fn):
        def go():
            for _ in range(args.iters):
                fn()
        return go

    # interleave the two, repeat by repeat, so that machine noise hits both alike; median of the repeats.
    # The warm-up (compilation included, with --compile: both models are compiled, each size anew) is timed apart.
    t = time.perf_counter()
    time_fn(many(run_sup), warmup=args.warmup, repeats=0)
    t_sup_warm = time.perf_counter() - t
    t = time.perf_counter()
    time_fn(many(run_pic), warmup=args.warmup, repeats=0)
    t_pic_warm = time.perf_counter() - t
    t_sup, t_pic = [], []
    for _ in range(args.repeats):
        t_sup += time_fn(many(run_sup), warmup=0, repeats=1)["all"]
        t_pic += time_fn(many(run_pic), warmup=0, repeats=1)["all"]
    sup_ips = batch * args.iters / statistics.median(t_sup)
    pic_ips = batch * args.iters / statistics.median(t_pic)
    return {"arch": arch, "size": size, "batch": batch, "supervised_img_s": round(sup_ips, 1),
            "pic_img_s": round(pic_ips, 1), "pic_overhead_pct": round(100 * (sup_ips / pic_ips - 1), 2),
            "negatives": args.negatives, "compiled": args.compile,
            "warmup_seconds": {"supervised": round(t_sup_warm, 2), "pic": round(t_pic_warm, 2)},
            "num_instances": n, "k": args.k if args.negatives == "recent" else None}


def pic_steps_run(args) -> int:
    """PIC steps one `bench_one` runs: time_fn(warmup, repeats=0) still makes one call after its warm-up, then
    `repeats` single calls; each call is `iters` steps. The lr table must cover every one of them."""
    return (args.warmup + 1 + args.repeats) * args.iters


def build_parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "python -m benchmarks.bench_step")
    ap.add_argument("--archs", default="resnet18", help="backbones, comma-separated (resnet18, resnet34, resnet50, "
                                                        "tiny)")
    ap.add_argument("--sizes", default="64", help="image sides, px, comma-separated")
    ap.add_argument("--batches", default="32", help="batch sizes, comma-separated")
    ap.add_argument("--num-instances", type=int, default=100_000, help="N: rows of the instance bank")
    ap.add_argument("--negatives", default="recent", choices=("full", "recent"), help="pic.negatives")
    ap.add_argument("--k", type=int, default=4096, help="pic.k: recent negatives")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "off"), help="autocast on CUDA")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels_last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the two steps interleaved)")
    ap.add_argument("--iters", type=int, default=2, help="steps per timed repeat")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record = Recorder("bench_step", args)
    device = pick_device(args.device)
    shapes = [(arch, int(size), int(batch)) for arch in args.archs.split(",") for size in args.sizes.split(",")
              for batch in args.batches.split(",")]
    rows = []
    for arch, size, batch in shapes:
        rows.append(bench_one(arch, size, batch, args, device))
        print(rows[-1], flush=True)
        record.partial(rows, {"device": str(device)})
    print_table(f"training step, synthetic data, {device}",
                ["arch", "size", "batch", "supervised_img_s", "pic_img_s", "pic_overhead_pct"], rows)
    return record.final(rows, {"device": str(device)})


if __name__ == "__main__":
    sys.exit(main())
