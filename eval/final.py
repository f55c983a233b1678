"""The end-of-run evaluation: the pre-trained model against the same architecture at random init.

(a) instance retrieval top-1 on the training images (eval.retrieval: a gallery of min(N, 100,000) of them), with
    the 128-d embedding PIC trains;
(b) weighted kNN top-1 of backbone features (eval.knn): the labelled data.eval_path images (a folder, file list or
    .beton; classes matched to the training set's by name) against the labelled training images, streamed.

The random-init baseline is backbone + head without a bank (a bank of N rows would be ~1 KB per instance for
nothing). Peak memory: the gallery's embeddings, the queries' features and one batch; nothing of size N but the
index the run already holds. A measure with nothing to read (no image decodes, no labels, an eval_path that is gone)
is skipped with one note: a run that trained never fails in its evaluation for want of data.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from config import Config
from eval.knn import knn_evaluate
from eval.retrieval import retrieval_top1
from model.pic import build_encoder
from pipeline.augment import seed_for
from pipeline.beton import open_index
from pipeline.dataset import DataError, InstanceIndex

_SALT_GALLERY = 0x6A11


def _measure(backbone, embed, cfg: Config, index: InstanceIndex, eval_index: InstanceIndex | None,
             device: torch.device, report: bool = True) -> dict[str, float]:
    """report: print the notes (undecodable images, left-out labels, a skipped measure) once: the random-init
    baseline reads the same images again."""
    out: dict[str, float] = {}
    size, w = cfg.data.image_size, min(cfg.data.workers, 4)
    try:  # a fresh training view (the training crop size) against the bank's task
        out["retrieval_top1"], out["retrieval_gallery"] = retrieval_top1(
            embed, index, cfg.aug, size, device, seed_for(cfg.run.seed, _SALT_GALLERY), workers=w, report=report)
    except DataError as e:
        _note(f"retrieval skipped: {e}", report)
    if eval_index is not None:
        try:
            # the training images' undecodable ones were named by the retrieval, unless its gallery was a subset
            named = out.get("retrieval_gallery") == len(index)
            out.update(knn_evaluate(backbone, index, eval_index, cfg.data.eval_size, device, k=cfg.run.knn_k,
                                    workers=w, report=report, report_neighbours=not named))
        except DataError as e:
            _note(f"kNN skipped: {e}", report)
    return out


def _note(line: str, report: bool) -> None:
    if report:
        print(f"note: {line}", flush=True)


def _eval_index(cfg: Config, index: InstanceIndex) -> InstanceIndex | None:
    """data.eval_path's index, or None with a note (no labels in the training set, or nothing readable there)."""
    d = cfg.data
    if not d.eval_path:
        return None
    if (index.labels < 0).all():
        _note(f"kNN skipped: no training image has a label (data.eval_path {d.eval_path} needs labelled neighbours)",
              True)
        return None
    try:
        eval_index = open_index(d.eval_path, d.ffcv_image_field, d.ffcv_label_field)
    except DataError as e:
        _note(f"kNN skipped: data.eval_path: {e}", True)
        return None
    if eval_index.images is not None and eval_index.images.note:
        print(eval_index.images.note, flush=True)
    return eval_index


def evaluate_run(cfg: Config, model, index: InstanceIndex, device: torch.device) -> dict[str, float]:
    eval_index = _eval_index(cfg, index)
    model.eval()
    trained = _measure(model.backbone, model.embed, cfg, index, eval_index, device)
    m = cfg.model
    baseline_encoder, _ = build_encoder(m.arch, head_hidden=m.head_hidden, dim=m.dim, seed=cfg.run.seed)
    baseline_encoder.to(device).eval()
    baseline = _measure(baseline_encoder.backbone, baseline_encoder.embed, cfg, index, eval_index, device,
                        report=False)
    results = dict(trained)
    results.update({f"{k}_random_init": v for k, v in baseline.items() if k in ("retrieval_top1", "knn_top1")})

    table = Table(title=f"PIC evaluation ({len(index)} training instances)")
    table.add_column("metric")
    table.add_column("random init", justify="right")
    table.add_column("PIC pre-trained", justify="right")
    names = {"retrieval_top1": f"instance retrieval top-1, gallery {trained.get('retrieval_gallery', 0):,} (%)",
             "knn_top1": f"kNN top-1 on {trained.get('knn_queries', 0):,} held-out images (%)"}
    for k, label in names.items():
        if k in trained and k in baseline:
            table.add_row(label, f"{baseline[k]:.2f}", f"{trained[k]:.2f}")
    Console().print(table)
    return results
