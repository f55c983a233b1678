"""Online kNN monitor: how good are the features now, measured a few times while the run trains.

Every `run.monitor_every` units (epochs or windows; -1 = about 4 points per run, plus one at the start) the current
backbone, in eval mode and without gradients, embeds a fixed, seeded subset of the training images
(`run.monitor_images`, at most) and, when `data.eval_path` is given, a fixed subset of those images, and reports:

* **kNN top-1** (weighted, k = run.knn_k = 20, T = 0.07, backbone features at data.eval_size): the eval subset
  against the labelled training subset when `data.eval_path` has images of the training set's classes (matched by
  class name, eval.labels; unlabelled images and classes the training set lacks are left out, and counted in the
  record's `knn_on`); otherwise leave-one-out over the labelled training subset (each image's neighbours are the
  other subset images); no kNN when nothing is labelled.
* **instance retrieval top-1** (the embedding PIC trains): each subset image's nearest plain view, among the
  subset's plain views (resize + centre crop at data.image_size), from one augmented view of it; the views are
  fixed for the run (explicit generators), so the points of a run are comparable. The gallery is the subset, not
  up to 100,000 instances, so the number is higher than the end-of-run eval's (eval.retrieval).

Images are read where the run reads them: the files, or the .beton of an FFCV run (pipeline.beton: its source folder
need not exist), and a `data.eval_path` .beton likewise. The subset is decoded once and kept in host memory as uint8
(M x 3 x size² bytes: 150 MB for 1,000 images at 224 px). The monitor never touches training randomness: it draws
only from its own generators (the global torch, numpy and python generators are left alone), runs the model in eval
mode (BN running statistics unchanged) and puts back the mode it found. Under torchrun only rank 0 evaluates; the
others go on to the next step and wait for rank 0 in its first collective (the monitor itself makes none).
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from config import Config, ConfigError
from eval.knn import knn_top1
from eval.labels import align_labels
from pipeline.augment import DeviceViews, batch_random_resized_crop, seed_for
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD, device_constant
from pipeline.beton import open_index
from pipeline.dataset import DataError, InstanceIndex
from pipeline.decode import DecodedImages
from plan import Resolved

AUTO_POINTS = 4  # monitor_every=-1: about this many points per run (and one before the first step)
_SALT_TRAIN, _SALT_EVAL, _SALT_VIEWS = 0x4D4F4E, 0x4D4F4E + 1, 0x4D4F4E + 2


def monitor_interval(cfg: Config, plan: Resolved) -> int:
    """Units between two monitor points; 0 = off."""
    every = cfg.run.monitor_every
    if every < -1 or (every != 0 and cfg.run.monitor_images < 1):
        raise ConfigError(f"run.monitor_every={every}, run.monitor_images={cfg.run.monitor_images}: use "
                          f"monitor_every -1 (auto), 0 (off) or a number of units, and monitor_images >= 1")
    if every == -1:
        return max(1, math.ceil(plan.num_units / AUTO_POINTS))
    return every


def seeded_subset(index: InstanceIndex, count: int, seed: int, among: np.ndarray | None = None) -> InstanceIndex:
    """`count` instances of `index` (of its positions `among`, when given) drawn with their own generator (sorted,
    so the subset reads in path order)."""
    pool = np.arange(len(index)) if among is None else among
    ids = pool if count >= len(pool) else np.sort(np.random.default_rng(seed).choice(pool, count, replace=False))
    return index.take(ids)


class Stopped(Exception):
    """The `stop` callable said yes between two batches (or images) of a point: the point is abandoned."""


def _never() -> bool:
    return False


def _decode(index: InstanceIndex, size: int, workers: int, stop=_never) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [M,3,size,size] (resize + centre crop, eval.features' rule) and labels [M] of the decodable images
    (index.labels: the caller puts them in the training set's numbering); raises Stopped when `stop()` turns true
    (checked after every image)."""
    ratio = 256 / 224 if size >= 96 else 1.0
    tf = T.Compose([T.Resize(round(size * ratio), antialias=True), T.CenterCrop(size), T.PILToTensor()])
    # Threads, not DataLoader workers: the first point can come when the training loader's threads (FFCV, DALI,
    # TensorBoard's writer) run, and forking a process with running threads can deadlock the child; PIL decodes
    # and resizes without the GIL.
    ds = DecodedImages(index, tf)
    items = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for x, i, _ in pool.map(ds.__getitem__, range(len(ds))):
            if stop():
                pool.shutdown(cancel_futures=True)  # the images not started are dropped; the running ones end
                raise Stopped
            if x is not None:
                items.append((x, i))
    if not items:  # undecodable images are left out (the loaders name them in bad_files.tsv)
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    ids = torch.tensor([i for _, i in items], dtype=torch.int64)
    images = [x for x, _ in items]
    return torch.stack(images), torch.from_numpy(index.labels[ids.numpy()])


class Monitor:
    """Built on rank 0; `due(step)` says whether a point is taken after `step` steps, `measure(model, step)`
    takes it and returns the log record."""

    def __init__(self, cfg: Config, index: InstanceIndex, plan: Resolved, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.stop = _never  # measure's `stop`, for the batches of the point it takes
        self.every = monitor_interval(cfg, plan)
        self.index, self.eval_path = index, cfg.data.eval_path
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # decoded at the first point
        self.seconds = 0.0  # all points together
        self.points = 0
        self.eval_note = ""  # what the eval subset left out (knn_on says it)
        aug = dataclasses.replace(cfg.aug, small_crops=0)  # one query view at the training crop size
        self.views = DeviceViews(aug, cfg.data.image_size, seed_for(cfg.run.seed, _SALT_VIEWS))
        self.amp = device.type == "cuda" and cfg.model.amp != "off"

    @classmethod
    def build(cls, cfg: Config, index: InstanceIndex, plan: Resolved, device: torch.device) -> Monitor | None:
        return cls(cfg, index, plan, device) if monitor_interval(cfg, plan) else None

    def due(self, step: int) -> bool:
        """A point before the first step, at the end of every `every`-th unit, and at the end of the run."""
        spu = self.plan.steps_per_unit
        return step % spu == 0 and ((step // spu) % self.every == 0 or step == self.plan.total_steps)

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        d, m, seed = self.cfg.data, self.cfg.run.monitor_images, self.cfg.run.seed
        workers = min(d.workers, 4)
        train = seeded_subset(self.index, m, seed_for(seed, _SALT_TRAIN))
        cache = {"train_eval": _decode(train, d.eval_size, workers, self.stop)}
        cache["train_view"] = (cache["train_eval"] if d.image_size == d.eval_size else
                               _decode(train, d.image_size, workers, self.stop))
        if self.eval_path:
            try:
                val = open_index(self.eval_path, d.ffcv_image_field, d.ffcv_label_field)
            except DataError as e:  # gone since the run started: the leave-one-out kNN instead, said once
                print(f"note: monitor: data.eval_path not read ({e}); kNN leave-one-out on training images", flush=True)
                return cache
            aligned = align_labels(self.index.classes, val)  # class names -> the training set's labels
            if len(aligned.kept):
                val = dataclasses.replace(val, labels=aligned.labels)
                cache["eval_eval"] = _decode(seeded_subset(val, m, seed_for(seed, _SALT_EVAL), aligned.kept),
                                             d.eval_size, workers, self.stop)
                left = [f"{n} {what}" for n, what in ((aligned.unknown, "of classes the training set lacks"),
                                                       (aligned.unlabelled, "unlabelled")) if n]
                self.eval_note = f"; left out of {val.root}: {', '.join(left)}" if left else ""
        return cache

    def _embed(self, fn, images: torch.Tensor, augment: bool = False, batch: int = 256) -> torch.Tensor:
        """fn(normalised images) of uint8 [M,3,H,W], in batches; augment: the query views (fixed per batch)."""
        out = []
        for s in range(0, images.shape[0], batch):
            if self.stop():
                raise Stopped
            x = images[s:s + batch].to(self.device).float().div_(255.0)
            if augment:  # crop, flip, colour, normalise (pipeline.augment, its own generator)
                x = self.views(partial(batch_random_resized_crop, x), 0, s // batch)[0]
            else:
                x = (x - device_constant(IMAGENET_MEAN, x)) / device_constant(IMAGENET_STD, x)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                out.append(fn(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def _embed_features(self, head, feats: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return torch.cat([head(feats[s:s + batch].to(self.device)).float().cpu()
                              for s in range(0, feats.shape[0], batch)])

    @torch.no_grad()
    def measure(self, model, step: int, epoch: float, stop=_never) -> dict | None:
        """The point after `step` steps: its log record, or None when `stop()` turned true between two of its
        batches (a SIGTERM during a long point is honoured after one batch, not after the point)."""
        t0 = time.perf_counter()
        self.stop = stop
        try:
            record = self._measure(model, step, epoch)
        except Stopped:
            record = None
        finally:
            self.stop = _never
            seconds = time.perf_counter() - t0
            self.seconds += seconds  # an abandoned point cost time too
        if record is not None:
            record["seconds"] = seconds
            self.points += 1
        return record

    def _measure(self, model, step: int, epoch: float) -> dict:
        if self.cache is None:
            self.cache = self._load()
        was_training = model.training
        model.eval()
        try:
            record = {"event": "monitor", "step": step, "epoch": epoch}
            tr_x, tr_y = self.cache["train_eval"]
            view_x, _ = self.cache["train_view"]
            record["images"] = int(view_x.shape[0])
            if not record["images"]:  # e.g. a .beton whose source folder is not on this machine
                record["note"] = f"no image of the monitor's subset of {self.index.root} decodes"
                return record
            k = self.cfg.run.knn_k
            feats = self._embed(model.backbone, tr_x)
            labelled = tr_y >= 0
            if "eval_eval" in self.cache and labelled.any() and (self.cache["eval_eval"][1] >= 0).any():
                ev_x, ev_y = self.cache["eval_eval"]
                keep = ev_y >= 0
                record["knn_top1"] = knn_top1(feats[labelled], tr_y[labelled], self._embed(model.backbone, ev_x)[keep],
                                              ev_y[keep], k=k)
                record["knn_on"] = (f"{int(keep.sum())} eval_path images vs {int(labelled.sum())} training images"
                                    f"{self.eval_note}")
            elif labelled.sum() > 1:
                f = feats[labelled]
                record["knn_top1"] = knn_top1(f, tr_y[labelled], f, tr_y[labelled], k=k, leave_one_out=True)
                record["knn_on"] = f"leave-one-out over {int(labelled.sum())} training images"
            if view_x is tr_x:  # one size: the gallery's embedding is the head over the kNN features
                gallery = self._embed_features(model.head, feats)
            else:
                gallery = self._embed(model.embed, view_x)
            gallery = F.normalize(gallery, dim=1)
            query = F.normalize(self._embed(model.embed, view_x, augment=True), dim=1)
            hits = (query @ gallery.t()).argmax(1) == torch.arange(len(gallery))
            record["retrieval_top1"] = 100.0 * hits.float().mean().item()
        finally:
            model.train(was_training)
        return record


    def summary(self, train_seconds: float) -> dict:
        """The monitor's cost in results.json: its seconds against the training's (train_seconds includes them)."""
        return {"monitor_points": self.points, "monitor_seconds": self.seconds,
                "monitor_pct_of_training": 100.0 * self.seconds / max(train_seconds - self.seconds, 1e-9)}

    def cost_line(self, train_seconds: float) -> str:
        s = self.summary(train_seconds)
        return (f"monitor: {s['monitor_points']} points, {s['monitor_seconds']:.1f} s = "
                f"{s['monitor_pct_of_training']:.1f} % of the {train_seconds - self.seconds:.0f} s of training")


def monitor_line(r: dict) -> str:
    """The console line of a monitor record."""
    if "note" in r:
        return f"monitor @ epoch {r['epoch']:.2f} (step {r['step']}): {r['note']}"
    knn = f"kNN top-1 {r['knn_top1']:.2f}% ({r['knn_on']})" if "knn_top1" in r else "kNN: no labels"
    ret = f"retrieval top-1 {r['retrieval_top1']:.2f}% of {r['images']}" if "retrieval_top1" in r else ""
    return f"monitor @ epoch {r['epoch']:.2f} (step {r['step']}): {knn} | {ret} | {r['seconds']:.2f} s"
