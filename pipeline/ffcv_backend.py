"""FFCV backend: a .beton (written by `pipeline.convert_ffcv` or by any FFCV writer: `pipeline.beton`), read by
FFCV 1.0.2's numba-compiled loader.

Per batch: FFCV threads decode each JPEG, random-resized-crop it to the view size and flip it (our seeded decoder,
below), FFCV copies the uint8 batch to the device, and there `BatchColorAugment` does colour jitter, grayscale, blur
and normalisation as torch ops (FFCV 1.0.2 has no blur, hue or grayscale op).

Where the normalisation runs: on a GPU, on the GPU (uint8 crosses PCIe: a quarter of the bytes of float32, and the
multiply-add is nothing there). On a CPU, a view with no colour augmentation (crop mode: the colour work left to
the device, or switched off) is normalised inside FFCV's numba threads (`NormalizeLUT`, a per-channel table of the
256 values, the same float32 numbers as `BatchColorAugment`'s), as ffcv-imagenet's CPU pipeline does: done by the
consumer's thread it took as long as FFCV needed for the rest of the batch. With colour augmentation the whole
view is finished by `BatchColorAugment` on the consumer's side (it needs floats in [0, 1] first).

* Order: our scheduler's. A custom `TraversalOrder` hands FFCV the .beton sample indices of `schedule.order(unit)`
  (this rank's ids: FFCV runs with distributed=False). Instance ids map to sample indices through the index
  (`pipeline.beton`: our manifest sidecar, our older `instance_id` field, or id = sample index for a foreign file),
  because rejected images leave gaps (sample index != instance id); an id that is not in the .beton (rejected at
  conversion) is replaced by the next present id of the order, the policy of every backend
  (`pipeline.base.substitutes`), so a unit always has its planned batches. `order="random" | "quasi_random"` ignore the
  scheduler (single process only; for loader benchmarks).
* Ids: FFCV itself reports which sample it decoded at each batch position (`SampleIndexDecoder`, a pipeline on the
  image field), mapped to the instance id: never the position in our order. Every other field is not decoded, so
  the label and any extra field of a foreign .beton cost nothing.
* start_batch: the order handed to FFCV starts at batch `start_batch`, so nothing is decoded and thrown away.
* Reproducibility: FFCV's own RandomResizedCrop / RandomHorizontalFlip draw from numba's per-thread RNG, which
  FFCV 1.0.2 never seeds (a resumed run would see other crops). `SeededRandomResizedCrop` draws every crop and flip
  from a hash of (seed, view, the batch's sample indices, position in batch) instead: a pure function of the order,
  so a resumed run sees the same batches. (Our schedules reshuffle every unit, so crops differ between epochs; a
  schedule that repeated an order exactly would repeat its crops.) Colour randomness: `generator(seed, epoch, k,
  view)` drawn for the global batch (`pipeline.augment.rand_rows`), as in the other backends. Under torchrun the
  crops are keyed by the rank's part of the batch (FFCV's compiled decoder sees only those sample indices), so a run
  resumed at another world size draws other crops for the same global batches; the colour draws are the same.
* Multi-crop: one more FFCV pipeline per small crop, reading the same `image` field
  (`PipelineSpec(source="image")`, supported by 1.0.2's pipeline graph even without FFCV-SSL's
  `custom_field_mapper`); each view decodes the JPEG again, as in FFCV-SSL.
* Decode cost: 1.0.2's RRC decoder decodes the whole JPEG, then crops and resizes (cv2 INTER_AREA); libffcv's
  crop-before-decode path (`imdecode(..., enable_crop=True)`) is not used by it, nor here.
* Buffers: FFCV reuses its output buffers (batches_ahead + 2 slots); the images we yield are fresh tensors from
  `BatchColorAugment`, the ids a copy. The decoder's scratch buffer is max_h x max_w x 3 bytes per sample per slot
  per view (e.g. 256 x 5 x 512² x 3 = 1 GB per view at batch 256, 512 px stored): lower batches_ahead if needed.
* First epoch: numba compiles the pipelines (3-6 s here for small images; 17-60 s seen elsewhere).
* Failures: if FFCV's pipeline thread raises (compile or decode error), upstream blocks forever; we raise.
* Threads: FFCV sets torch's intra-op threads to its worker count; we restore the caller's setting.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader as FFCVBaseLoader
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order import QuasiRandom
from ffcv.traversal_order.base import TraversalOrder
from ffcv.traversal_order.quasi_random import generate_order_inner
from numba import njit

from config import Config
from pipeline.augment import BatchColorAugment, generator, normalisation_table, seed_for, view_specs
from pipeline.base import BadFiles, Batch, LoaderBase
from pipeline.beton import BetonImages, beton_index, sample_instance_ids
from pipeline.dataset import DataError, InstanceIndex

ORDERS = ("schedule", "random", "quasi_random")
ffcv_index = beton_index  # the instance table of a .beton, under its older name (pipeline.beton owns it)


# ---------------------------------------------------------------------------------------------------------------
# seeded random-resized-crop + flip decoder (numba)
# ---------------------------------------------------------------------------------------------------------------

# Draw numbers of one sample's stream: 0..19 the crop's 10 (area, aspect) attempts, then its position, then the flip.
_TOP_DRAW, _LEFT_DRAW, _FLIP_DRAW = 20, 21, 22


@njit(nogil=True, cache=False)
def _mix(h: np.uint64, v: np.uint64) -> np.uint64:
    """splitmix64-style combination of a running hash with one value (all uint64: no float promotion)."""
    h = h ^ (v + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2)))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> np.uint64(31))


@njit(nogil=True, cache=False)
def _uniform(key: np.uint64, n: int) -> float:
    """The n-th uniform [0, 1) number of the stream `key` (counter-based: no state)."""
    x = _mix(key, np.uint64(n))
    x = _mix(x, np.uint64(0x632BE59BD9B4E019))
    return float(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(nogil=True, cache=False)
def _rrc_box(height, width, s0, s1, logr0, logr1, key):
    """torchvision's RandomResizedCrop rule (as ffcv.fields.rgb_image.get_random_crop), drawing from `key`.

    Returns (top, left, crop_h, crop_w).
    """
    area = height * width
    for attempt in range(10):
        target = area * (s0 + (s1 - s0) * _uniform(key, 2 * attempt))
        aspect = math.exp(logr0 + (logr1 - logr0) * _uniform(key, 2 * attempt + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(_uniform(key, _TOP_DRAW) * (height - h + 1))
            j = int(_uniform(key, _LEFT_DRAW) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < math.exp(logr0):
        w = width
        h = max(1, int(round(w / math.exp(logr0))))
    elif in_ratio > math.exp(logr1):
        h = height
        w = max(1, int(round(h * math.exp(logr1))))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(nogil=True, cache=False)
def _hflip_inplace(img):
    """uint8 [H,W,3] mirrored left-right in place."""
    h, w = img.shape[0], img.shape[1]
    for r in range(h):
        for c in range(w // 2):
            for ch in range(3):
                t = img[r, c, ch]
                img[r, c, ch] = img[r, w - 1 - c, ch]
                img[r, w - 1 - c, ch] = t


@njit(nogil=True, cache=False)
def _batch_key(seed, batch_indices):
    k = np.uint64(seed)
    for i in range(len(batch_indices)):
        k = _mix(k, np.uint64(batch_indices[i]))
    return k


# Every Loader compiles libffcv's imdecode/resize_crop anew (as upstream does). When such a dispatcher is garbage
# collected while the process goes on (a second Loader, pytest's end-of-session gc), numba's finalizer raises
# KeyError ("Exception ignored in: <finalize object ...>"; seen with stock ffcv 1.0.2 loaders too). Keeping them
# until interpreter shutdown, where numba skips its finalizers, avoids that noise. Sharing one dispatcher between
# Loaders is worse: the second Loader's compile then fails with that KeyError in FFCV's thread.
_KEEP_ALIVE: list = []


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """RandomResizedCropRGBImageDecoder + horizontal flip, with the randomness drawn from a hash of
    (seed, the batch's sample indices, position in batch) instead of numba's unseeded per-thread RNG.

    Output: uint8 [B, size, size, 3] (HWC, FFCV's layout). The decode itself is upstream's (ffcv 1.0.2
    ResizedCropRGBImageDecoder.generate_code): full JPEG decode into a temp buffer, crop, INTER_AREA resize.
    """

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                 flip_p: float, seed: int):
        super().__init__(output_size, scale, ratio)
        self.flip_p = float(flip_p)
        self.seed = int(seed) & 0xFFFFFFFFFFFFFFFF

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        _KEEP_ALIVE.extend((imdecode_c, resize_crop_c))
        s0, s1 = float(self.scale[0]), float(self.scale[1])
        logr0, logr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        flip_p, seed = self.flip_p, np.uint64(self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            batch_key = _batch_key(seed, batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                key = _mix(batch_key, np.uint64(dst_ix))
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = _rrc_box(np.int64(height), np.int64(width), s0, s1, logr0, logr1, key)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                if _uniform(key, _FLIP_DRAW) < flip_p:
                    _hflip_inplace(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SampleIndexDecoder(IntDecoder):
    """int64 [B,1]: the .beton sample index FFCV decoded at each position of the batch (whatever the field's
    values): the batch's ids come from what FFCV read, not from where we expected it in the order."""

    def generate_code(self) -> Callable:
        def decode(batch_indices, destination, metadata, storage_state):
            for ix in range(len(batch_indices)):
                destination[ix, 0] = batch_indices[ix]
            return destination[:len(batch_indices)]

        return decode


class NormalizeLUT(NormalizeImage):
    """FFCV's NormalizeImage (uint8 [B,H,W,3] -> float32, per-channel lookup in FFCV's threads) with our table:
    the values `BatchColorAugment` computes for a view without colour augmentation, bit for bit."""

    def __init__(self):
        super().__init__(np.zeros(3), np.ones(3), np.float32)
        self.lookup_table = normalisation_table()  # float32 [256, 3]


# ---------------------------------------------------------------------------------------------------------------
# traversal order
# ---------------------------------------------------------------------------------------------------------------


class _FixedOrder(TraversalOrder):
    """Hands FFCV the sample indices the FFCVLoader prepared for the epoch it is about to iterate.

    FFCV 1.0.2 accepts a custom order as an *instance* and then calls it with the loader (`order(self)` in
    Loader.__init__), so `__call__` binds the loader and returns the instance itself.
    """

    def __init__(self, order_fn: Callable[[int], np.ndarray]):
        self.order_fn = order_fn
        self.quasi: QuasiRandom | None = None

    def __call__(self, loader) -> _FixedOrder:
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order_fn(epoch)


def _next_or_raise(it) -> tuple | None:
    """EpochIterator.__next__ (ffcv 1.0.2), returning None at the end, and raising if FFCV's thread died.

    Upstream blocks on its queue forever when the thread that runs the pipelines raises (a numba compile or
    decode error): the traceback is printed and training silently hangs.
    """
    while True:
        try:
            result = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive():
                raise RuntimeError("FFCV's loader thread died; its traceback is printed above") from None
    if result is None:
        it.close()
        return None
    slot, out = result
    if it.cuda_streams[slot] is not None:  # wait for the pipeline's copy to the device (as upstream)
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return out


# ---------------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------------


class FFCVLoader(LoaderBase):
    """Batches of a .beton (cfg.data.path) in our scheduler's order; see the module docstring.

    cfg: uses data.path (.beton), data.ffcv_image_field / ffcv_label_field, data.image_size, data.workers (FFCV
         threads), aug.* (crops, flip, colour), run.seed, model.channels_last.
    index: the instance table (`pipeline.beton.beton_index(beton)`, or the source folder's `load_index`):
           len(index) = N.
    schedule: `order(unit) -> int64 ids` of this rank; unused for order="random"/"quasi_random".
    order: "schedule" | "random" | "quasi_random" (FFCV's page-local shuffle; single process only).
    batches_ahead, os_cache: FFCV Loader options (os_cache=False: FFCV's own page cache, for sets larger than RAM).
    """

    name = "ffcv"

    def __init__(self, cfg: Config, index: InstanceIndex, schedule, device: torch.device, batch_size: int,
                 bad_files: BadFiles | None = None, *, order: str = "schedule", batches_ahead: int = 3,
                 os_cache: bool = True):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        path = Path(cfg.data.path)
        if not path.is_file():
            raise DataError(f".beton file does not exist: {path} (make one with python -m pipeline.convert_ffcv)")
        super().__init__(cfg, index, schedule, device, batch_size, bad_files)
        self.order_mode = order
        d = cfg.data
        beton = index if isinstance(index.images, BetonImages) else beton_index(path, d.ffcv_image_field,
                                                                                d.ffcv_label_field)
        self.layout = beton.images.layout
        self.sample_ids = sample_instance_ids(beton)  # instance id of every .beton sample (-1: never read)
        self.sample_of_id = self._invert(self.sample_ids, self.num_instances, path)
        self.live_samples = np.flatnonzero(self.sample_ids >= 0)  # all but old tombstones and ids past a subset
        for iid in np.flatnonzero(self.sample_of_id < 0).tolist():  # rejected at conversion: never in the .beton
            self.bad_files.add(iid, f"rejected when {path.name} was written (see {path.name}.rejects.tsv)")
        self.specs = view_specs(cfg.aug, cfg.data.image_size)
        self.color = [BatchColorAugment(cfg.aug, size) for size, _ in self.specs]
        self.normalised_in_ffcv = self.normalise_in_ffcv()
        # What the traversal order hands FFCV next; set by iter_epoch (this placeholder only serves Loader.__init__).
        self._pending = np.arange(len(self.sample_ids) // batch_size * batch_size, dtype=np.uint64)
        torch_threads = torch.get_num_threads()
        self.ffcv = FFCVBaseLoader(
            str(path), batch_size=batch_size, num_workers=cfg.data.workers, os_cache=os_cache,
            order=_FixedOrder(lambda epoch: self._pending), distributed=False, seed=self.seed,
            pipelines=self._pipelines(), drop_last=True, batches_ahead=batches_ahead)
        torch.set_num_threads(torch_threads)  # FFCV sets torch's threads to its worker count: keep the caller's
        if order == "quasi_random":
            self.ffcv.traversal_order.quasi = QuasiRandom(self.ffcv)
        # output tuple order = the graph's leaf order (fields in file order, then the extra crop pipelines)
        self.outputs = list(self.ffcv.graph.leaf_nodes)

    @staticmethod
    def _invert(sample_ids: np.ndarray, n: int, path: Path) -> np.ndarray:
        """int64 [n]: sample index of every instance id < n, -1 where the .beton has none (rejected at conversion).
        Samples with id -1 (our older tombstones) and samples of ids >= n (outside data.subset) are never read."""
        if sample_ids.size and sample_ids.min() < -1:
            raise DataError(f"{path}: negative instance ids below -1")
        inv = np.full(n, -1, dtype=np.int64)
        live = np.flatnonzero((sample_ids >= 0) & (sample_ids < n))
        inv[sample_ids[live]] = live
        return inv

    # -- pipelines ---------------------------------------------------------------------------------------------
    def normalise_in_ffcv(self) -> bool:
        """On a CPU, views that need normalising only are normalised by FFCV's threads (module doc)."""
        return self.device.type == "cpu" and all(c.normalise_only for c in self.color)

    def _pipelines(self) -> dict:
        """image -> uint8 [B,3,s,s] on the device (channels_last on CUDA), or on a CPU without colour augmentation
        normalised float32 [B,3,s,s] (channels_last: a view of FFCV's buffer); "__sample" -> int64 [B,1] (the sample
        indices, from the image field's pipeline); every field of the file not decoded (None)."""
        cuda = self.device.type == "cuda"
        cl = cuda and self.cfg.model.channels_last

        def view(v: int, size: int, scale: tuple[float, float]) -> list:
            decoder = SeededRandomResizedCrop((size, size), scale, self.cfg.aug.crop_ratio, self.cfg.aug.flip_p,
                                              seed_for(self.seed, 0xFFC, v))
            # JIT ops (the decoder, the normalisation) first, then the torch ones: a JIT op after a non-JIT op makes
            # FFCV 1.0.2's graph grouping loop forever (seen with FFCV 1.0.2).
            if self.normalised_in_ffcv:
                return [decoder, NormalizeLUT(), ToTensor(), ToTorchImage(channels_last=True)]
            tail = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if cuda else [])
            return [decoder, *tail, ToTorchImage(channels_last=cl)]

        (size0, scale0), *small = self.specs
        image = self.layout.image
        pipes: dict = {name: None for name in self.layout.fields}
        pipes["image"] = PipelineSpec(image, decoder=(ops := view(0, size0, scale0))[0], transforms=ops[1:])
        pipes["__sample"] = PipelineSpec(image, decoder=SampleIndexDecoder(), transforms=[ToTensor()])
        for v, (size, scale) in enumerate(small, start=1):
            ops = view(v, size, scale)
            pipes[f"crop{v}"] = PipelineSpec(image, decoder=ops[0], transforms=ops[1:])
        return pipes

    # -- order ---------------------------------------------------------------------------------------------------
    def _ids_order(self, unit: int) -> np.ndarray:
        """Sample indices of unit `unit` (all, not yet cut into batches)."""
        if self.order_mode == "random":
            return np.random.default_rng([self.seed, unit]).permutation(self.live_samples)
        if self.order_mode == "quasi_random":
            order = self._quasi_random(unit)
            return order[self.sample_ids[order] >= 0]
        ids = np.asarray(self.schedule.order(unit), dtype=np.int64)
        samples = self.sample_of_id[ids]
        present = np.flatnonzero(samples >= 0)
        if len(present) == 0:
            raise DataError(f"no image of unit {unit} is in {self.cfg.data.path}")
        if len(present) < len(samples):  # rejected images: the next present image of the order stands in
            nxt = np.searchsorted(present, np.arange(len(samples))) % len(present)  # `pipeline.base.substitutes`
            samples = samples[present[nxt]]
        return samples

    def _quasi_random(self, unit: int) -> np.ndarray:
        """FFCV's QUASI_RANDOM order (shuffle within a few pages at a time, fewer reads when the set exceeds RAM).

        QuasiRandom.sample_order shuffles its page table in place, so calling it twice for one epoch gives two
        orders (ffcv issue #140); running its kernel on a copy makes it a pure function of (seed, unit).
        """
        q = self.ffcv.traversal_order.quasi
        out = np.zeros(len(q.indices), dtype=np.int64)
        generate_order_inner(self.seed * 912300 + unit, q.page_to_samples_array.copy(), q.page_sizes, out,
                             2 * self.batch_size)
        return out

    def _sample_order(self, unit: int, start_batch: int) -> np.ndarray:
        """uint64 sample indices of the full batches start_batch.. of unit `unit` (drop_last)."""
        order = self._ids_order(unit)
        b = self.batch_size
        return np.ascontiguousarray(order[start_batch * b:(len(order) // b) * b], dtype=np.uint64)

    def __len__(self) -> int:
        """Full batches per unit: of the schedule's order (rejected images have stand-ins), or of the .beton."""
        if self.order_mode != "schedule":
            return len(self.live_samples) // self.batch_size
        return super().__len__()

    # -- iteration -------------------------------------------------------------------------------------------
    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of unit `epoch` from batch `start_batch` on. A Batch is valid until the next one is requested.

        One epoch at a time: FFCV's loader holds a single pending order (set when this generator starts)."""
        self._pending = self._sample_order(epoch, start_batch)
        if len(self._pending) == 0:
            return
        # Loader.__iter__ keeps only len(self) * batch_size samples, len() being that of `first_traversal_order`,
        # and names the epoch by its own counter: set both for this unit.
        self.ffcv.first_traversal_order = self._pending
        self.ffcv.next_epoch = epoch
        torch_threads = torch.get_num_threads()
        it = iter(self.ffcv)
        torch.set_num_threads(torch_threads)
        finished = False
        try:
            k = start_batch
            while (out := _next_or_raise(it)) is not None:
                yield self._batch(dict(zip(self.outputs, out, strict=True)), epoch, k)
                k += 1
            finished = True  # (an exhausted EpochIterator has closed itself)
        finally:
            if not finished:  # abandoned mid-epoch: FFCV's thread stops once its queue is full; then free its memory
                it.terminate_event.set()
                it.join(timeout=60)
                it.close()

    def _batch(self, out: dict, epoch: int, k: int) -> Batch:
        # (indexing makes a new array: FFCV reuses its output buffers)
        ids_host = torch.from_numpy(self.sample_ids[out["__sample"].view(-1).numpy()])
        ids = ids_host.to(self.device, non_blocking=True, copy=True)
        names = ["image"] + [f"crop{v}" for v in range(1, len(self.specs))]
        if self.normalised_in_ffcv:  # FFCV's buffers: valid until the next batch (pipeline.base's contract)
            views = tuple(out[name] for name in names)
        else:
            views = tuple(aug(out[name], generator(self.seed, epoch, k, v), self.rows)
                          for v, (aug, name) in enumerate(zip(self.color, names, strict=True)))
        return Batch(views[0], ids, views[1:], ids_host)
