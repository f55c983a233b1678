"""Every backend of the registry against the Batch contract, on real JPEGs whose colour encodes the id (ffcv reads a
.beton, not the folder: tests/test_ffcv.py and tests/test_robustness.py run it on converted folders)."""

import warnings

import numpy as np
import pytest
import torch
from conftest import decode_ids, no_aug, tiny_config, write_id_folder
from PIL import Image

from pipeline import BACKENDS, backend_unavailable, make_loader
from pipeline.dataset import scan_folder


class FixedOrder:
    def __init__(self, order):
        self._order = np.asarray(order, dtype=np.int64)

    def order(self, unit):
        return np.roll(self._order, unit)


# the registry's folder-reading backends that can run here (DALI's tests skip cleanly where it is absent)
FOLDER_BACKENDS = [b for b in BACKENDS if b != "ffcv" and not backend_unavailable(b)]
VARIANTS = [(b, {}) for b in FOLDER_BACKENDS] + [("torch", {"workers": 2}), ("torch", {"color_aug_on": "device"}),
                                                  ("torch-gpu", {"workers": 2})]


def test_the_registry_is_covered():
    assert set(FOLDER_BACKENDS) >= {"torch", "memory", "torch-gpu"} and set(BACKENDS) - set(FOLDER_BACKENDS) <= {
        "ffcv", "dali"}


@pytest.mark.parametrize("backend,extra", VARIANTS)
def test_ids_match_pixels_and_schedule_order(id_folder, tmp_path, backend, extra):
    cfg = no_aug(tiny_config(str(id_folder), str(tmp_path), data={"backend": backend, **extra}))
    index = scan_folder(id_folder)
    order = np.random.default_rng(3).permutation(len(index))
    loader = make_loader(cfg, index, FixedOrder(order), torch.device("cpu"), 16)
    assert len(loader) == 3
    for epoch in (0, 1):
        seen = []
        for k, batch in enumerate(loader.iter_epoch(epoch)):
            assert batch.images.dtype == torch.float32 and batch.images.shape == (16, 3, 16, 16)
            assert batch.ids.dtype == torch.int64
            assert batch.ids.tolist() == np.roll(order, epoch)[16 * k:16 * (k + 1)].tolist()
            assert batch.ids_host.device.type == "cpu" and torch.equal(batch.ids_host, batch.ids.cpu())
            assert decode_ids(batch.images).tolist() == batch.ids.tolist()
            seen.append(k)
        assert seen == [0, 1, 2]
    # start_batch skips, and the remaining batches are the same as in the full pass
    rest = [b.ids.tolist() for b in loader.iter_epoch(0, start_batch=2)]
    assert rest == [order[32:48].tolist()]


def test_augmentation_is_a_function_of_seed_epoch_position(id_folder, tmp_path):
    cfg = tiny_config(str(id_folder), str(tmp_path), data={"backend": "torch"})
    index = scan_folder(id_folder)
    order = np.arange(len(index))
    a = make_loader(cfg, index, FixedOrder(order), torch.device("cpu"), 16)
    first = [b.images.clone() for b in a.iter_epoch(0)]
    again = list(a.iter_epoch(0, start_batch=1))
    assert torch.equal(first[1], again[0].images)
    other_epoch = next(iter(a.iter_epoch(1)))
    assert not torch.equal(first[0], other_epoch.images)


def test_multicrop_batches(id_folder, tmp_path):
    cfg = no_aug(tiny_config(str(id_folder), str(tmp_path), aug={"small_crops": 2, "small_size": 8}))
    for backend in FOLDER_BACKENDS:
        cfg.data.backend = backend
        index = scan_folder(id_folder)
        batch = next(iter(make_loader(cfg, index, FixedOrder(np.arange(48)), torch.device("cpu"), 16).iter_epoch(0)))
        assert [c.shape for c in batch.crops] == [(16, 3, 8, 8)] * 2
        assert decode_ids(batch.crops[1]).tolist() == batch.ids.tolist()


def test_corrupt_images_are_replaced_and_named_once(tmp_path):
    root = write_id_folder(tmp_path / "d", n=31)  # + x.jpg = 32 = two full batches
    bad = root / "class_0" / "img_005.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    Image.new("RGB", (4, 4)).save(root / "class_1" / "x.jpg")
    (root / "class_1" / "x.jpg").write_text("garbage")
    index = scan_folder(root)
    bad_ids = {index.paths.index("class_0/img_005.jpg"), index.paths.index("class_1/x.jpg")}
    for backend in FOLDER_BACKENDS:
        cfg = no_aug(tiny_config(str(root), str(tmp_path), data={"backend": backend}))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loader = make_loader(cfg, index, FixedOrder(np.arange(len(index))), torch.device("cpu"), 16)
            batches = list(loader.iter_epoch(0)) + list(loader.iter_epoch(1))
        assert len(loader.corrupt) == 2 and set(loader.corrupt) == bad_ids, backend
        assert sum("undecodable" in str(x.message) for x in w) == 1, backend  # one note, not one per file/epoch
        for b in batches:  # full batches, each id with its own pixels, the bad ones replaced by the next image
            assert len(b.ids) == 16 and not bad_ids & set(b.ids.tolist())
            assert decode_ids(b.images).tolist() == b.ids.tolist()
        ids = batches[0].ids.tolist()
        assert ids[5] == 6 == ids[6], backend
