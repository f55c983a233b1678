"""The end-of-run evaluation: the pre-trained model against the same architecture at random init.

(a) instance retrieval top-1 on the training images (eval.retrieval), with the 128-d embedding PIC trains;
(b) weighted kNN top-1 of backbone features, held-out labelled images against the labelled training images.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from config import Config
from eval.features import extract
from eval.knn import knn_top1
from eval.retrieval import retrieval_top1
from model.pic import PIC, build_pic
from pipeline.dataset import InstanceIndex, load_index


def _measure(model: PIC, cfg: Config, index: InstanceIndex, eval_index: InstanceIndex | None,
             device: torch.device, report: bool = True) -> dict[str, float]:
    """report: name the undecodable images (once per folder: the same files fail in every pass, and the random-init
    baseline decodes them all again)."""
    model.eval()
    size, w = cfg.data.image_size, min(cfg.data.workers, 4)
    # retrieval: a fresh training view (the training crop size) against the bank's task; kNN: eval images
    out = {"retrieval_top1": retrieval_top1(model.embed, index, cfg.aug, size, device, cfg.run.seed, workers=w,
                                            report=report)}
    if eval_index is not None:
        ftr, ytr, _ = extract(model.backbone, index, cfg.data.eval_size, device, workers=w, report=False)
        fva, yva, _ = extract(model.backbone, eval_index, cfg.data.eval_size, device, workers=w, report=report)
        keep = ytr >= 0
        out["knn_top1"] = knn_top1(ftr[keep], ytr[keep], fva, yva, k=cfg.run.knn_k)
    return out


def evaluate_run(cfg: Config, model: PIC, index: InstanceIndex, device: torch.device) -> dict[str, float]:
    eval_index = load_index(cfg.data.eval_path) if cfg.data.eval_path else None
    if eval_index is not None and (index.labels < 0).all():
        eval_index = None  # unlabelled training set: no kNN
    trained = _measure(model, cfg, index, eval_index, device)
    m = cfg.model
    random_model = build_pic(m.arch, head_hidden=m.head_hidden, dim=m.dim, seed=cfg.run.seed).to(device)
    baseline = _measure(random_model, cfg, index, eval_index, device, report=False)
    results = dict(trained)
    results.update({f"{k}_random_init": v for k, v in baseline.items()})

    table = Table(title=f"PIC evaluation ({len(index)} training instances)")
    table.add_column("metric")
    table.add_column("random init", justify="right")
    table.add_column("PIC pre-trained", justify="right")
    names = {"retrieval_top1": "instance retrieval top-1 (%)", "knn_top1": "kNN top-1 on held-out images (%)"}
    for k, label in names.items():
        if k in trained:
            table.add_row(label, f"{baseline[k]:.2f}", f"{trained[k]:.2f}")
    Console().print(table)
    return results
