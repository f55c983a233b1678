"""NVIDIA DALI backend: our scheduler's order in, decode + crop + SimCLR augmentation in DALI, `Batch` out.

One graph builder serves both devices: on CUDA the JPEGs are decoded by nvJPEG (`device="mixed"`) and every
augmentation runs as a DALI GPU operator; on a CPU-only machine the same graph runs with CPU
operators (`Pipeline(device_id=None)`), which is what the tests use and is a usable CPU backend.

Reader: `fn.external_source` in batch mode, not `fn.readers.file`
-------------------------------------------------------------------
A Python callback maps (epoch, batch k) to the k-th slice of `schedule.order(epoch)`: it reads those files'
encoded bytes, the instance ids *of those very files*, and the random parameters of every view, and hands them to
DALI as one batch. We chose this over `fn.readers.file(files=..., labels=ids)` rebuilt per epoch/window because:

* The order is ours, with no translation: the sliding-window scheduler changes the order every window, and a file
  reader would need a pipeline rebuild (thread pools, nvJPEG state, buffers) per window. Here one pipeline lives for
  the whole run; `start_batch` simply starts the callback at batch k, so skipped batches are never read or decoded.
* Exact resume. DALI's random operators draw from per-operator generator state that advances batch by batch and
  cannot be re-seeded without a rebuild, so a run resumed at (epoch, k) would see different crops than the
  uninterrupted run. Instead every random choice (crop box, flip, jitter factors, grayscale, blur and sigma) is drawn
  in Python from `generator(seed, epoch, k)` (drawn for the whole global batch k, of which a rank keeps its rows)
  and fed as per-sample arguments: batch k of epoch e is the same pixels whatever the thread count, prefetch depth,
  resume point or world size (the `Loader` contract in `pipeline.base`). The crop boxes use
  `augment.sample_rrc_boxes`, torchvision's RandomResizedCrop rule, like the other backends; this needs the image
  size, which we read from the file header with PIL once per instance and cache (~50 us per image).
* Ids travel with the bytes, and are int64 end to end (no int32 [B,1] labels to convert).
Cost: Python reads the files and draws the parameters on the consumer's thread. The loader benchmark compares this
against a `fn.readers.file` pipeline of the same operators (figures in the README and benchmark records); a
parallel external source (worker processes) or a read-ahead thread is the next step if it shows in GPU profiles.

Augmentation (spec §7), per view: crop -> resize to the view size (linear, antialiased, as torchvision's
RandomResizedCrop; on the GPU DALI's `fn.resize`, on the CPU by default our numba kernel with the same filter, run
by DALI's `numba_function` on its thread pool: DALI's CPU resampler was the bottleneck, see `pipeline.resample`)
-> `color_twist` (brightness, contrast, saturation, hue; neutral factors when jitter is not
applied, so no conditional is needed; grayscale = saturation 0 in the same op) -> Gaussian blur with p (a DALI
conditional, so unblurred images cost nothing) -> `crop_mirror_normalize` (flip, ImageNet mean/std, float, CHW;
HWC for channels_last, which a permute turns into a channels_last NCHW tensor without a copy).
Crop: with one view, only the crop window is decoded (`decoders.image_slice` with our box: crop while decoding, like
`image_random_crop` but with our random box); with multi-crop (the large crop with `aug.crop_scale` at
`data.image_size`, then `aug.small_crops` crops with `aug.small_scale` at `aug.small_size`) the image is decoded
once and every view is an ROI resize of it (faster on CPU than one window decode per view, see
`augment_graph`).
Differences from torchvision, inherent to DALI's fused colour op: the four jitter ops are one linear map in a fixed
order, clamped once at the end; contrast is centred on mid-grey (128), not on the image's mean grey; hue is a
rotation in YIQ (like `augment.BatchColorAugment`). The blur window is DALI's default for each sigma (see
`_random_blur`). Flip is applied last, which is equivalent (every later op is mirror-symmetric).

Buffers: with DALI's default (dynamic) executor the output buffers are handed to torch by DLPack and stay valid
while referenced; with the legacy executor DALI recycles them, so we copy. Either way, callers follow the
`pipeline.base` rule: consume (or `.clone()`) a batch before asking for the next.

Last batch: drop_last, like the other backends: len = len(order) // batch_size, every batch exactly B. An image
DALI cannot take is replaced by the next decodable one of the unit (`pipeline.base.substitutes`): truncated files
and unreadable headers are caught before DALI sees them, formats DALI would refuse or convert differently are handed
over as PIL's decode (`image_header`), and a pipeline failure anyway is traced to its file with PIL and the unit
replayed from that batch (`DALILoader._recover`).

CPU speed: DALI's CPU resampler was the bottleneck (hence our numba resize), and one DALI thread more than cores
helps (`dali_threads`); the figures are in the README and the loader benchmark's records.

The `device="mixed"` decoders, the GPU operators, the nvJPEG options and the GPU DLPack hand-over run only on a GPU
(tests/test_dali.py's CUDA cases); the CPU graph is the same code with `decoder="cpu"`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from PIL import Image

from config import AugConfig, Config
from pipeline.augment import blur_sigma_px, generator, rand_rows, sample_rrc_boxes, view_specs
from pipeline.base import IMAGENET_MEAN, IMAGENET_STD, BadFiles, Batch, LoaderBase, first_good
from pipeline.dataset import DataError, InstanceIndex
from pipeline.decode import CorruptImageError, DecodedImages, decode_rgb
from pipeline.resample import resize_aa, resize_aa_roi
from pipeline.schedule import BatchRows

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


# ---------------------------------------------------------------------------------------------------------------
# views: what each crop branch does, and its random parameters
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewPlan:
    """One crop group. `color=False` gives decode + random-resized-crop + flip + normalise only (the `crop` mode)."""

    size: int
    scale: tuple[float, float]
    color: bool
    blur: bool  # blur_p > 0 (and color)
    sigma: tuple[float, float]  # blur sigma range at this size, px

    def names(self) -> list[str]:
        """The per-sample parameters this view needs, in the order the callback emits them."""
        n = ["start", "shape", "mirror"]
        if self.color:
            n += ["brightness", "contrast", "saturation", "hue"]
        if self.blur:
            n += ["blur", "sigma"]
        return n


def make_plans(aug: AugConfig, image_size: int, color: bool) -> list[ViewPlan]:
    """The large crop first, then the small crops of multi-crop (same order as `Batch.images`, `Batch.crops`)."""
    return [ViewPlan(size, scale, color, color and aug.blur_p > 0, blur_sigma_px(aug))
            for size, scale in view_specs(aug, image_size)]


# dtype of each parameter as fed to DALI (argument inputs must be CPU, one value or vector per sample)
_PARAM_DTYPES = {
    "start": (types.FLOAT, np.float32), "shape": (types.FLOAT, np.float32), "mirror": (types.INT32, np.int32),
    "brightness": (types.FLOAT, np.float32), "contrast": (types.FLOAT, np.float32),
    "saturation": (types.FLOAT, np.float32), "hue": (types.FLOAT, np.float32),
    "blur": (types.BOOL, np.bool_), "sigma": (types.FLOAT, np.float32),
}


def draw_view_params(plan: ViewPlan, aug: AugConfig, heights: torch.Tensor, widths: torch.Tensor,
                     gen: torch.Generator, rows: BatchRows | None = None) -> dict[str, np.ndarray]:
    """Random parameters of one view for a batch of images of sizes heights, widths ([b] each), which are `rows`
    of the global batch (`pipeline.augment.rand_rows`; default all).

    Returns {name: array} with, per sample: start (y, x) and shape (h, w) of the crop in pixels ([b,2] float32),
    mirror [b] int32, and with colour: brightness/contrast/saturation factors and hue in degrees ([b] float32;
    exactly neutral, 1/1/1/0, when jitter is not applied; saturation 0 = grayscale), blur [b] bool, sigma [b] px.
    """
    rows = rows or BatchRows.whole(heights.shape[0])
    boxes = sample_rrc_boxes(heights, widths, plan.scale, aug.crop_ratio, gen, rows=rows)  # [b,4] x1,y1,x2,y2
    out = {
        "start": boxes[:, [1, 0]].numpy(),
        "shape": (boxes[:, [3, 2]] - boxes[:, [1, 0]]).numpy(),
        "mirror": (rand_rows(gen, rows) < aug.flip_p).numpy(),
    }
    if plan.color:
        bj, cj, sj, hj = aug.jitter
        apply = (rand_rows(gen, rows) < aug.jitter_p).double()
        f = rand_rows(gen, rows, 4, dtype=torch.float64) * 2 - 1  # U(-1, 1), torchvision's ranges

        def factor(col: int, strength: float) -> torch.Tensor:
            return (1 + apply * f[:, col] * strength).clamp(min=0)

        gray = rand_rows(gen, rows) < aug.gray_p
        out["brightness"] = factor(0, bj).numpy()
        out["contrast"] = factor(1, cj).numpy()
        out["saturation"] = torch.where(gray, 0.0, factor(2, sj)).numpy()
        out["hue"] = (apply * f[:, 3] * hj * 360.0).numpy()
    if plan.blur:
        out["blur"] = (rand_rows(gen, rows) < aug.blur_p).numpy()
        out["sigma"] = (plan.sigma[0] + rand_rows(gen, rows) * (plan.sigma[1] - plan.sigma[0])).numpy()
    return {k: np.ascontiguousarray(v, dtype=_PARAM_DTYPES[k][1]) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# the external source: (epoch, batch k) -> encoded bytes, ids, view parameters
# ---------------------------------------------------------------------------------------------------------------


def image_header(data: bytes) -> tuple[int, int, bool]:
    """(height, width, plain) of an encoded image, from its header only: (height, width) as the decoder will output
    it (EXIF orientation applied); raises OSError/ValueError/SyntaxError for data PIL cannot identify.

    plain = an 8-bit RGB or grayscale JPEG or PNG, which DALI decodes as `decode_rgb`
    does. Anything else (GIF, CMYK, 16-bit, palette or alpha, TIFF, WebP, ...) is handed to DALI re-encoded from
    `decode_rgb` (see EpochSource._checked_bytes): the same pixels as every other backend, and nothing DALI's
    decoders would refuse or convert differently."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        # DALI applies EXIF orientation (checked for JPEG, PNG, WebP, TIFF), as `decode_rgb` does
        if img.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
        plain = img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and "transparency" not in img.info
    return h, w, plain


class EpochSource:
    """The `fn.external_source` callback (batch mode, `batch_info=True`).

    DALI calls it with BatchInfo.iteration = 0, 1, ... after every `reset()`; iteration i is batch
    `start_batch + i` of the current epoch's order. It raises StopIteration after the last full batch (drop_last)
    or once `stop()` was called, which is how an epoch ends or is abandoned.
    """

    def __init__(self, index: InstanceIndex, plans: list[ViewPlan], aug: AugConfig, seed: int, batch_size: int,
                 bad_files: BadFiles, rows: BatchRows | None = None):
        self.index = index
        self.plans = plans
        self.aug = aug
        self.seed = seed
        self.batch_size = batch_size
        self.rows = rows or BatchRows.whole(batch_size)  # this rank's rows of every global batch
        self.sizes = np.full((len(index), 2), -1, np.int64)  # (h, w) per instance, read once
        self.reencode: set[int] = set()  # ids handed to DALI as BMP from PIL's decode (see image_header)
        self.bad_files = bad_files
        self.names = ["encoded", "ids"] + [f"v{v}_{n}" for v, p in enumerate(plans) for n in p.names()]
        self.batches_read: list[int] = []  # batch numbers handed to DALI this epoch (tests check start_batch)
        self.start(0, np.zeros(0, np.int64), 0)

    def dali_dtypes(self) -> list:
        return [types.UINT8, types.INT64] + [_PARAM_DTYPES[n.split("_", 1)[1]][0] for n in self.names[2:]]

    def start(self, epoch: int, order: np.ndarray, start_batch: int) -> None:
        self.epoch, self.order, self.start_batch = epoch, order, start_batch
        self.num_batches = len(order) // self.batch_size
        self.stopped = False
        self.batches_read = []

    def stop(self) -> None:
        self.stopped = True

    def __call__(self, info) -> tuple:
        k = self.start_batch + info.iteration
        if self.stopped or k >= self.num_batches:
            raise StopIteration
        self.batches_read.append(k)
        encoded, ids, hw = self._read(k)
        gen = generator(self.seed, self.epoch, k)
        h, w = torch.from_numpy(hw[:, 0]), torch.from_numpy(hw[:, 1])
        params = {f"v{v}_{n}": a for v, p in enumerate(self.plans)
                  for n, a in draw_view_params(p, self.aug, h, w, gen, self.rows).items()}
        return (encoded, ids) + tuple(params[n] for n in self.names[2:])

    def _read(self, k: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Encoded bytes, ids and (h, w) of batch k: B samples, an unreadable file replaced by the next readable
        one of the order (`pipeline.base.substitutes`)."""
        b = self.batch_size
        encoded, kept = [], []
        for j in range(k * b, (k + 1) * b):
            iid, data = first_good(self.order, j, self.bad_files, self._checked_bytes)
            encoded.append(np.frombuffer(data, np.uint8))
            kept.append(iid)
        kept_ids = np.asarray(kept, np.int64)
        return encoded, kept_ids, self.sizes[kept_ids]

    def _checked_bytes(self, iid: int) -> bytes:
        """The file's bytes, if its header parses and it is not cut short; raises CorruptImageError otherwise.

        A file DALI's decoders cannot read fails the whole pipeline (and DALI does not say which file), so what
        can be seen without decoding is caught here: an unreadable header, and a truncated JPEG or PNG (no end
        marker). `DALILoader` catches what gets past this (see `_recover`)."""
        path = self.index.abspath(iid)
        with open(path, "rb") as f:
            data = f.read()
        jpeg_cut = data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]
        png_cut = data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]
        if jpeg_cut or png_cut:  # no end marker: truncated, or data appended after it; PIL decides, as elsewhere
            decode_rgb(path)
        if self.sizes[iid, 0] < 0:
            try:
                h, w, plain = image_header(data)
            except (OSError, ValueError, SyntaxError):
                decode_rgb(path)  # raises the reference decoder's reason, naming the file
                raise CorruptImageError(f"{path}: no readable image header") from None
            self.sizes[iid] = (h, w)
            if not plain:
                self.reencode.add(iid)
        if iid in self.reencode:  # see image_header
            buf = io.BytesIO()
            decode_rgb(path).save(buf, "BMP")
            data = buf.getvalue()
        return data


# ---------------------------------------------------------------------------------------------------------------
# the graph (one builder for CPU and GPU)
# ---------------------------------------------------------------------------------------------------------------


def _random_blur(img, apply, sigma):
    """Gaussian blur of the samples where `apply` is true (per-sample sigma); the others pass through untouched.

    A DALI conditional: only the selected samples are blurred. The window is DALI's default for each sigma (about
    ±3σ, like PIL's GaussianBlur in the spec's transform.py), not torchvision's fixed 10 % of the side: the same
    blur up to the <0.3 % of the kernel mass beyond 3σ. Chosen for speed: a conditional costs nothing for the
    unblurred samples, where blurring every sample (near-zero sigma for the others) or a fixed wide window does.
    """
    if apply:
        img = fn.gaussian_blur(img, sigma=sigma)
    return img


@do_not_convert
def _numba_resize_fns(size: int, roi: bool):
    """(run_fn, setup_fn) for `numba_function`: uint8 HWC image (+ start [2], shape [2] float32 with roi) ->
    uint8 [size,size,C], by `pipeline.resample` (antialiased bilinear, the filter of DALI's linear resize)."""
    if roi:
        def run(out, img, start, shape):
            resize_aa_roi(out, img, start[0], start[1], shape[0], shape[1])
    else:
        def run(out, img):
            resize_aa(out, img)

    def setup(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = size
            outs[0][i][1] = size
            outs[0][i][2] = ins[0][i][2]

    return run, setup


_NUMBA_RESIZE_OPS: dict = {}  # (size, roi) -> NumbaFunction op, compiled once per process


def _numba_resize(img, size: int, start=None, shape=None):
    """`fn.resize(img, size=[size,size], interp_type=LINEAR, antialias=True)` (optionally of the window start/shape)
    on DALI's CPU thread pool with our numba kernel; see `pipeline.resample` for why.

    The op object is made once per (size, roi) and reused by every pipeline of the process: DALI compiles the
    wrappers of a numba function when the op is created (~1.5 s each), not when it runs.
    """
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    roi = start is not None
    op = _NUMBA_RESIZE_OPS.get((size, roi))
    if op is None:
        run, setup = _numba_resize_fns(size, roi)
        op = _NUMBA_RESIZE_OPS[(size, roi)] = NumbaFunction(
            run_fn=run, setup_fn=setup, in_types=[types.UINT8] + [types.FLOAT] * (2 * roi),
            ins_ndim=[3] + [1] * (2 * roi), out_types=[types.UINT8], outs_ndim=[3])
    return op(img, start, shape) if roi else op(img)


def _crop(encoded, decoded, p: dict, plan: ViewPlan, decoder: str, decoder_options: dict, resize: str):
    """The view's crop window resized to [size,size,3] uint8 (HWC).

    decoded is None: decode only the window (`image_slice`: libjpeg-turbo / nvJPEG skip most of the rest).
    Otherwise: resize the window out of the already decoded image (ROI resize; one decode serves every view).
    resize: "dali" (`fn.resize`, linear + antialias) or "numba" (the same filter by our kernel; CPU graph only).
    """
    dali_resize = dict(size=[plan.size, plan.size], interp_type=types.INTERP_LINEAR, antialias=True)
    if decoded is None:
        img = fn.decoders.image_slice(encoded, p["start"], p["shape"], device=decoder, output_type=types.RGB,
                                      axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                      **decoder_options)
        return _numba_resize(img, plan.size) if resize == "numba" else fn.resize(img, **dali_resize)
    if resize == "numba":
        return _numba_resize(decoded, plan.size, p["start"], p["shape"])
    return fn.resize(decoded, roi_start=p["start"], roi_end=p["start"] + p["shape"], roi_relative=False,
                     **dali_resize)


def _augment(img, p: dict, plan: ViewPlan, layout: str):
    """uint8 HWC crop -> colour jitter / grayscale / blur (when the plan says so) -> flip + normalise, float."""
    if plan.color:
        img = fn.color_twist(img, brightness=p["brightness"], contrast=p["contrast"],
                             saturation=p["saturation"], hue=p["hue"])
    if plan.blur:
        img = _random_blur(img, p["blur"], p["sigma"])
    return fn.crop_mirror_normalize(img, mirror=p["mirror"], dtype=types.FLOAT, output_layout=layout,
                                    mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD])


@pipeline_def(enable_conditionals=True)
def augment_graph(source: EpochSource, decoder: str, decoder_options: dict, layout: str, resize: str = "dali"):
    """ids int64 [B], then one float image batch per view. `decoder` is "cpu" or "mixed" (nvJPEG, GPU output);
    `resize` "dali" or "numba" (CPU only; see `_crop`).

    One view: crop while decoding (a window decode reads less than the whole image). Several views (multi-crop):
    decode once and crop every view from the decoded image, which on the CPU beat one window decode per view.
    """
    nodes = fn.external_source(source=source, num_outputs=len(source.names), batch=True, batch_info=True,
                               dtype=source.dali_dtypes())
    named = {name: nodes[i] for i, name in enumerate(source.names)}  # (autograph's zip has no strict=)
    encoded = named["encoded"]
    decoded = None
    if len(source.plans) > 1:
        decoded = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **decoder_options)
    views = []
    for v, plan in enumerate(source.plans):
        p = {n: named[f"v{v}_{n}"] for n in plan.names()}
        views.append(_augment(_crop(encoded, decoded, p, plan, decoder, decoder_options, resize), p, plan, layout))
    return (named["ids"], *views)


# ---------------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------------


CPU_RESIZERS = ("numba", "dali")


def dali_threads(workers: int, gpu: bool) -> int:
    """DALI's thread-pool size for `data.workers` decode workers: one more than the workers on the CPU graph.

    Every CPU operator of a batch ends at a barrier (its samples are spread over the pool, and the next operator
    starts when the last one is done), and our external source runs on the consumer's thread: with as many threads
    as cores, the cores idle at those barriers (measured: README, loader records). With the mixed decoder the CPU
    threads mostly feed nvJPEG; there we keep the workers as given.
    """
    workers = max(1, workers)
    return workers if gpu else workers + 1


class _PipelineFailed(Exception):
    """DALI's pipeline raised (a decoder failed on a file, for a batch at or shortly after the one asked for)."""


class DALILoader(LoaderBase):
    """`Loader` over a DALI pipeline; see the module docstring.

    cfg: data.image_size, data.workers (DALI threads, see `dali_threads`), aug.* (views and their randomness), run.seed,
         model.channels_last (used on CUDA only).
    schedule: `schedule.order(unit) -> int64 [n]` instance ids of epoch/window `unit` for this rank, in order.
    color: False = crop mode (decode + random-resized-crop + flip + normalise; no jitter/grayscale/blur).
    channels_last: images in channels_last memory format (free: DALI writes HWC); default: model.channels_last on
         CUDA, off on CPU.
    device_memory_padding, host_memory_padding, hw_decoder_load: nvJPEG options (mixed decoder only). DALI's
         defaults; the older NVIDIA ImageNet recipe used 211025920 / 140544512 bytes of padding to avoid
         re-allocations on ImageNet's largest images, at the cost of memory. `decoder_options` passes any other
         mixed-decoder argument (e.g. preallocate_width_hint/height_hint for the HW decoder) to the decoders.
    prefetch: DALI prefetch queue depth (batches decoded ahead).
    cpu_resize: the CPU graph's resize: "numba" (default; `pipeline.resample`, the same antialiased bilinear filter,
         faster than DALI's CPU resampler) or "dali" (`fn.resize`). The GPU graph always uses DALI's.
    """

    name = "dali"

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None, *, color: bool = True, channels_last: bool | None = None,
                 prefetch: int = 2,
                 device_memory_padding: int = 16 << 20, host_memory_padding: int = 8 << 20,
                 hw_decoder_load: float = 0.65, decoder_options: dict | None = None, cpu_resize: str = "numba"):
        if cpu_resize not in CPU_RESIZERS:
            raise ValueError(f"cpu_resize must be one of {CPU_RESIZERS}, got {cpu_resize!r}")
        super().__init__(cfg, index, schedule, device, batch_size, bad_files)
        self.gpu = self.device.type == "cuda"
        # channels_last: the config's choice applies on CUDA only (as for the model); an explicit value always wins
        self.channels_last = cfg.model.channels_last and self.gpu if channels_last is None else channels_last
        self.prefetch = prefetch
        self.num_threads = dali_threads(cfg.data.workers, self.gpu)
        self.resize = "dali" if self.gpu else cpu_resize
        # a config with every colour op switched off is the crop mode: skip the colour graph altogether
        a = cfg.aug
        color = color and (a.jitter_p > 0 or a.gray_p > 0 or a.blur_p > 0)
        self.source = EpochSource(index, make_plans(cfg.aug, cfg.data.image_size, color), cfg.aug, cfg.run.seed,
                                  batch_size, self.bad_files, self.rows)
        self.decoder_options = {} if not self.gpu else {
            "device_memory_padding": device_memory_padding, "host_memory_padding": host_memory_padding,
            "hw_decoder_load": hw_decoder_load, **(decoder_options or {})}
        self._pipe = None
        self._active: object | None = None  # token of the epoch generator that owns the pipeline
        self._mid_epoch = False  # the pipeline has started an epoch that was not yet drained and reset

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch.. of epoch `epoch`. A batch is valid until the next one is requested."""
        order = self._order(epoch)
        pipe = self._pipeline()
        self._abandon(pipe)  # a previous epoch left unfinished (consumer broke out): stop and drain it
        self.source.start(epoch, order, start_batch)
        self._mid_epoch = True
        token = self._active = object()
        try:
            k = start_batch
            while k < self.source.num_batches:
                try:
                    outs = self._run(pipe, epoch, k)
                except _PipelineFailed as e:
                    self._recover(order, k, e.__cause__)  # names the culprits (or raises DataError)
                    pipe = self._pipeline()  # a fresh pipeline replays the unit from batch k, culprits replaced
                    self.source.start(epoch, order, k)
                    self._mid_epoch = True
                    continue
                yield self._to_batch(outs, pipe.exec_dynamic)
                k += 1
                if self._active is not token:
                    raise RuntimeError("DALILoader.iter_epoch: another epoch was started while this one was "
                                       "being consumed; one loader serves one epoch at a time")
        finally:
            if self._active is token:
                self._active = None
                self._abandon(pipe)

    def _recover(self, order: np.ndarray, k: int, error: BaseException | None) -> None:
        """DALI failed at or shortly after batch k, without naming the file: decode every not yet known-bad file
        of batches k .. k+prefetch+1 with PIL (the reference decoder of every backend) and record those that fail.
        None failing means the cause is not a file we can name: a DataError with DALI's message."""
        b, n = self.batch_size, len(order)
        # the batches DALI may have been decoding, and one batch more for their stand-ins (cyclic at the unit's end)
        positions = np.arange(k * b, (k + self.prefetch + 3) * b) % n
        window = sorted({int(i) for i in order[positions]} - set(self.bad_files.reasons))

        decoded = DecodedImages(self.index, transform=None)

        def check(iid: int) -> str:  # "" or why PIL cannot decode it
            return decoded[iid][2]

        with ThreadPoolExecutor(max(1, self.num_threads)) as pool:  # PIL decodes without the GIL
            found = [(iid, r) for iid, r in zip(window, pool.map(check, window), strict=True) if r]
        if not found:
            raise DataError(f"DALI failed at or shortly after batch {k} and every file of batches {k}.."
                            f"{k + self.prefetch + 1} decodes with PIL: {error}") from error
        for iid, reason in found:
            self.bad_files.add(iid, f"{reason} (DALI: {str(error).splitlines()[0] if error else '?'})")

    # -- internals ----------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        order = np.asarray(self.schedule.order(epoch), dtype=np.int64)
        if order.ndim != 1:
            raise ValueError(f"schedule.order({epoch}) must be 1-D, got shape {order.shape}")
        if order.size and (order.min() < 0 or order.max() >= self.num_instances):
            raise DataError(f"schedule.order({epoch}) has ids outside [0, {self.num_instances}): "
                            f"min {order.min()}, max {order.max()}")
        return order

    def _pipeline(self):
        """Built once (lazily) and reused for every epoch; rebuilt only after an error left it in an unknown state."""
        if self._pipe is None:
            device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
                if self.gpu else None
            self._pipe = augment_graph(
                self.source, "mixed" if self.gpu else "cpu", self.decoder_options,
                "HWC" if self.channels_last else "CHW", self.resize,
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                seed=self.cfg.run.seed & 0x7FFFFFFF, prefetch_queue_depth=self.prefetch)
            self._pipe.build()
            self._mid_epoch = False
        return self._pipe

    def _run(self, pipe, epoch: int, k: int):
        """One `pipe.run()`: the outputs of batch k. A failure of DALI itself (a decoder, possibly for a batch
        prefetched after k) raises `_PipelineFailed` from it; the pipeline is then dropped (rebuilt on demand)."""
        try:
            return pipe.run()
        except StopIteration:
            raise RuntimeError(f"DALI pipeline ended early at batch {k} of epoch {epoch}") from None
        except DataError:
            self._pipe = None
            raise
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError (and others) for decode failures
            self._pipe = None
            raise _PipelineFailed() from e

    def _abandon(self, pipe) -> None:
        """Bring the pipeline to a clean epoch boundary: stop the source, drain what DALI prefetched, reset.

        At a normal end of epoch nothing is left to drain (the source already raised StopIteration while DALI was
        prefetching), so this costs one call; after an early exit it discards at most `prefetch` batches.
        """
        if pipe is not self._pipe or not self._mid_epoch:
            return
        self._mid_epoch = False
        self.source.stop()
        try:
            while True:
                pipe.run()
        except StopIteration:
            pipe.reset()
        except Exception:  # noqa: BLE001 - a batch nobody asked for failed to decode: start afresh next time
            self._pipe = None

    def _to_batch(self, outs, zero_copy: bool) -> Batch:
        """DALI outputs (ids int64 [B] on CPU, views float [B,3,h,w] or [B,h,w,3]) -> Batch on self.device."""
        ids_host = self._to_torch(outs[0], zero_copy)  # (zero-copy: DALI keeps it alive while torch holds it)
        ids = self._host_to_device(ids_host)
        views = [self._to_torch(o, zero_copy) for o in outs[1:]]
        if self.channels_last:  # [B,H,W,3] -> [B,3,H,W] view with channels_last strides
            views = [v.permute(0, 3, 1, 2) for v in views]
        views = [self._host_to_device(v) for v in views]
        return Batch(views[0], ids, tuple(views[1:]), ids_host if ids_host.device.type == "cpu" else None)

    def _host_to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A DALI CPU output on self.device. A non-blocking copy reads its source after this returns, and DALI
        recycles (or, zero-copy, frees) its buffers once we drop them: copy out of DALI's (possibly pinned)
        memory into a pinned tensor of our own first, then copy that to the device without waiting."""
        if t.device == self.device:
            return t
        if t.device.type == "cpu" and self.device.type == "cuda":
            # a pinned block of our own (torch's pinned cache keeps it until the copy has run): `pin_memory()`
            # would hand back DALI's own buffer when that is pinned already
            staged = torch.empty_like(t, pin_memory=True)
            staged.copy_(t)
            t = staged
        return t.to(self.device, non_blocking=True)

    def _to_torch(self, tensor_list, zero_copy: bool) -> torch.Tensor:
        """A DALI TensorList (CPU or GPU) as a torch tensor: zero-copy under the dynamic executor (DALI hands the
        buffer over and keeps it alive while torch holds it), else a copy (the legacy executor recycles its
        buffers). The same rule as DALIGenericIterator."""
        t = tensor_list.as_tensor()
        gpu = isinstance(t, TensorGPU)
        if zero_copy:
            if gpu:
                # DLPack stream hand-over on the pipeline's GPU, as DALIGenericIterator does (`with torch.device`
                # would only set the default device for new tensors, not the current CUDA device)
                with torch.cuda.device(self.device):
                    return torch.from_dlpack(t)
            return torch.from_dlpack(t)
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device if gpu else "cpu")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device) if gpu else None)
        return out

