"""FFCV files travel both ways, on the CPU with real FFCV.

In: a .beton written by FFCV's own DatasetWriter, with exactly the field set of ffcv-imagenet's write_imagenet.py
(`image` = RGBImageField(write_mode='proportion', max_resolution=256, compress_probability=0.5, jpeg_quality=90),
`label` = IntField, from torchvision's ImageFolder), trains through train.py with a val .beton for the end-of-run
kNN; other writers' layouts (other field names, an extra int field) are found by type or named by a data.* key.
Out: a .beton written by our converter from a folder with bad files runs in ffcv-imagenet's loader code unchanged.
Older files of ours (an `instance_id` field, tombstones -1) keep training.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import decode_ids, write_id_folder

from pipeline import backend_unavailable

FFCV_MISSING = backend_unavailable("ffcv")
pytestmark = [pytest.mark.ffcv, pytest.mark.skipif(bool(FFCV_MISSING), reason=FFCV_MISSING or "-")]


def write_with_ffcv(folder, out, fields: dict | None = None, item=lambda x, y, j: (x, y)) -> None:
    """FFCV's DatasetWriter over torchvision's ImageFolder, as write_imagenet.py does (its field set by default);
    item(image, label, sample index) -> the sample's field values."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    class Items(torch.utils.data.Dataset):
        def __init__(self):
            self.inner = ImageFolder(str(folder))

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, j):
            return item(*self.inner[j], j)

    fields = fields or {"image": RGBImageField(write_mode="proportion", max_resolution=256, compress_probability=0.5,
                                               jpeg_quality=90), "label": IntField()}
    DatasetWriter(str(out), fields, num_workers=1).from_indexed_dataset(Items(), chunksize=100)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    import train

    capsys.readouterr()  # (what came before: FFCV's writer's progress bar)
    code = train.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _argv(beton, out_dir, *extra) -> list[str]:
    return [f"--data.path={beton}", "--data.backend=ffcv", "--data.workers=1", "--data.batch_size=16",
            "--data.image_size=16", "--data.eval_size=16", "--model.arch=tiny", "--model.head_hidden=32",
            "--model.dim=16", "--optim.epochs=1", "--optim.warmup_epochs=0", "--optim.lr=0.1", "--run.log_every=1",
            "--run.threads=2", "--run.device=cpu", f"--run.out_dir={out_dir}", "--run.name=t", "--run.monitor_every=0",
            *extra]


def test_trains_on_a_beton_written_by_ffcvs_own_writer(tmp_path, capsys):
    """write_imagenet.py's .beton, no sidecars: 3 steps through train.py (48 images, batch 16), ids = sample index
    (the colours say so), labels from its label field, and the end-of-run kNN reads the val .beton."""
    from config import Config
    from pipeline.beton import beton_index
    from pipeline.ffcv_backend import FFCVLoader

    write_with_ffcv(write_id_folder(tmp_path / "train", n=48), tmp_path / "train.beton")
    write_with_ffcv(write_id_folder(tmp_path / "val", n=20), tmp_path / "val.beton")
    shutil.rmtree(tmp_path / "train")
    shutil.rmtree(tmp_path / "val")
    code, out, err = _run(_argv(tmp_path / "train.beton", tmp_path / "runs", f"--data.eval_path={tmp_path}/val.beton",
                                "--run.eval=auto"), capsys)
    assert code == 0, err
    assert "train.beton has no sidecar files of pipeline.convert_ffcv: instance id = sample index, N = 48 " \
           "samples, labels from its int field 'label'" in out
    results = json.loads((tmp_path / "runs/t/results.json").read_text())
    assert results["steps"] == 3 and results["num_instances"] == 48
    assert results["knn_queries"] == 20 and 0 <= results["knn_top1"] <= 100 and results["retrieval_gallery"] == 48
    # ids are the sample indices, and the pixels are theirs
    index = beton_index(tmp_path / "train.beton")
    assert index.classes == ("0", "1") and index.labels.tolist() == [0] * 24 + [1] * 24
    cfg = Config()
    cfg.data.path, cfg.data.image_size, cfg.data.workers = str(tmp_path / "train.beton"), 16, 1
    cfg.aug.jitter_p = cfg.aug.gray_p = cfg.aug.blur_p = 0.0

    class Order:
        def order(self, unit):
            return np.random.default_rng(unit).permutation(48)

    for batch in FFCVLoader(cfg, index, Order(), torch.device("cpu"), 16).iter_epoch(0):
        assert torch.equal(decode_ids(batch.images), batch.ids)


@pytest.mark.parametrize("layout", ["img+label", "image+label+idx", "image+target+idx", "no image"])
def test_other_writers_layouts_are_found_by_type_or_named(tmp_path, capsys, layout):
    from ffcv.fields import FloatField, IntField, RGBImageField

    from pipeline.beton import beton_index

    img = RGBImageField(write_mode="raw", max_resolution=64)
    fields, item = {
        "img+label": ({"img": img, "label": IntField()}, lambda x, y, j: (x, y)),  # other names
        "image+label+idx": ({"image": img, "label": IntField(), "idx": IntField()}, lambda x, y, j: (x, y, j)),
        "image+target+idx": ({"image": img, "target": IntField(), "idx": IntField()}, lambda x, y, j: (x, y, j)),
        "no image": ({"label": IntField(), "score": FloatField()}, lambda x, y, j: (y, 0.5)),
    }[layout]
    write_with_ffcv(write_id_folder(tmp_path / "src", n=32), tmp_path / "x.beton", fields, item)
    argv = _argv(tmp_path / "x.beton", tmp_path / "runs", "--run.max_steps=1", "--run.eval=none")
    code, out, err = _run(argv, capsys)
    if layout == "no image":
        assert code == 2 and err.count("\n") == 1
        assert err.startswith("error: ") and "has no RGB image field (fields: label (IntField), score (FloatField))" \
            in err
        return
    if layout == "image+target+idx":  # two int fields, neither named label: refused, then named
        assert code == 2 and err.count("\n") == 1 and "several label fields (target, idx)" in err
        assert "--data.ffcv_label_field=NAME" in err
        code, out, err = _run([*argv, "--data.ffcv_label_field=target", "--run.name=t2"], capsys)
    assert code == 0, err
    label = "target" if layout == "image+target+idx" else "label"
    assert f"labels from its int field '{label}'" in out
    assert beton_index(tmp_path / "x.beton", label_field="target" if label == "target" else "").labels.tolist() == \
        [0] * 16 + [1] * 16


def _dirty_folder(root):
    """24 good images in 3 classes, and bad files: truncated (passes the header scan, fails in the write pass),
    not an image, empty."""
    import io

    from conftest import id_color
    from PIL import Image

    for i in range(24):
        d = root / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), id_color(i)).save(d / f"img_{i:03d}.jpg", quality=95)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "class_1/truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (root / "class_2/text.jpg").write_text("not an image")
    (root / "class_0/empty.jpg").write_bytes(b"")
    return root


def test_our_beton_runs_in_ffcv_imagenets_loader_unchanged(tmp_path):
    """ffcv-imagenet's loader code over our converter's .beton of a dirty folder: two outputs per batch, every label
    a class index, exactly the written images (no placeholder, no tombstone)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    from pipeline.beton import beton_index, sample_instance_ids
    from pipeline.convert_ffcv import ConvertSettings, convert

    src = _dirty_folder(tmp_path / "src")
    out = tmp_path / "train.beton"
    report = convert(str(src), str(out), ConvertSettings(max_resolution=32, write_mode="proportion", workers=1))
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    label_pipeline = [IntDecoder(), ToTensor(), Squeeze()]
    # its train loader (CPU order: decode, flip, normalise, to tensor, to torch image), drop_last as it does
    train_pipeline = [RandomResizedCropRGBImageDecoder((16, 16)), RandomHorizontalFlip(),
                      NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    loader = Loader(str(out), batch_size=5, num_workers=1, order=OrderOption.RANDOM, drop_last=True,
                    pipelines={"image": train_pipeline, "label": label_pipeline})
    seen = 0
    for ims, labs in loader:  # two fields per batch
        assert ims.shape == (5, 3, 16, 16) and ((labs >= 0) & (labs < 3)).all()
        seen += len(labs)
    assert seen == 24 // 5 * 5
    # its val loader (in order, nothing dropped): every written image once, with its label
    val_pipeline = [CenterCropRGBImageDecoder((16, 16), ratio=224 / 256), NormalizeImage(mean, std, np.float32),
                    ToTensor(), ToTorchImage()]
    loader = Loader(str(out), batch_size=5, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": val_pipeline, "label": label_pipeline})
    labels = torch.cat([labs for _, labs in loader])
    assert report.written == 24 and report.rejected == 2 and report.write_rejects == 1
    index = beton_index(out)
    ids = sample_instance_ids(index)
    assert len(labels) == report.written == len(ids) and (ids >= 0).all()
    assert labels.tolist() == index.labels[ids].tolist()
    # and our trainer still gets its ids and its rejects from the sidecars
    rejected = {index.paths[i] for i in np.flatnonzero(~np.isin(np.arange(len(index)), ids))}
    assert rejected == {"class_1/truncated.jpg", "class_2/text.jpg"}


def test_older_three_field_betons_keep_training(tmp_path):
    """A .beton of our older layout (image, instance_id with -1 tombstones, label; sidecars): the loader reads the
    ids from the field and never a tombstone."""
    from ffcv.fields import IntField, RGBImageField
    from PIL import Image

    from config import Config
    from pipeline.beton import beton_index
    from pipeline.dataset import load_index
    from pipeline.ffcv_backend import FFCVLoader

    src = write_id_folder(tmp_path / "src", n=24)
    index = load_index(src)
    tomb = np.zeros((1, 1, 3), np.uint8)
    samples = [(np.asarray(Image.open(index.abspath(i)).convert("RGB")), i, int(index.labels[i])) if i != 5 else
               (tomb, -1, -1) for i in range(24)]
    fields = {"image": RGBImageField(write_mode="raw"), "instance_id": IntField(), "label": IntField()}
    out = tmp_path / "old.beton"
    from ffcv.writer import DatasetWriter

    DatasetWriter(str(out), fields, num_workers=1).from_indexed_dataset(samples)
    index.write_manifest(f"{out}.manifest.tsv", [i for i in range(24) if i != 5])
    (tmp_path / "old.beton.rejects.tsv").write_text(f"path\treason\tinstance_id\n{index.paths[5]}\tbroken\t5\n")
    (tmp_path / "old.beton.json").write_text(json.dumps({"format": "pic-ffcv/1", "num_instances": 24,
                                                         "classes": list(index.classes), "source": str(src)}))
    old = beton_index(out)
    assert len(old) == 24 and old.images.samples[5] == -1
    cfg = Config()
    cfg.data.path, cfg.data.image_size, cfg.data.workers = str(out), 16, 1
    cfg.aug.jitter_p = cfg.aug.gray_p = cfg.aug.blur_p = 0.0

    class Order:
        def order(self, unit):
            return np.arange(24)

    loader = FFCVLoader(cfg, old, Order(), torch.device("cpu"), 4)
    assert loader.bad_files.total() == 1
    ids = torch.cat([b.ids for b in loader.iter_epoch(0)])
    assert 5 not in ids.tolist() and sorted(set(ids.tolist())) == [i for i in range(24) if i != 5]
    for b in loader.iter_epoch(1):
        assert torch.equal(decode_ids(b.images), b.ids)


def test_a_run_whose_source_folders_are_gone_evaluates_from_the_betons(tmp_path, capsys):
    """Convert once, ship the .beton: the monitor and the end-of-run evaluation read it, with no source folder; an
    eval_path that does not exist is refused before any work, in one line naming the key."""
    from pipeline.convert_ffcv import ConvertSettings, convert

    for name, n in (("train", 48), ("val", 20)):
        convert(str(write_id_folder(tmp_path / name, n=n)), str(tmp_path / f"{name}.beton"),
                ConvertSettings(max_resolution=40, workers=1))
    shutil.rmtree(tmp_path / "train")
    argv = _argv(tmp_path / "train.beton", tmp_path / "runs", "--run.eval=auto", "--run.monitor_every=1",
                 "--run.monitor_images=16")
    code, out, err = _run([*argv, f"--data.eval_path={tmp_path}/val.beton"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "runs/t/results.json").read_text())
    assert "knn_top1" in results and "retrieval_top1" in results and results["knn_queries"] == 20
    points = [json.loads(x) for x in (tmp_path / "runs/t/log.jsonl").read_text().splitlines()
              if '"monitor"' in x]
    assert len(points) == 2 and all(p["images"] == 16 and "retrieval_top1" in p and "eval_path" in p["knn_on"]
                                    for p in points)
    shutil.rmtree(tmp_path / "val")  # a folder eval_path that has gone
    code, out, err = _run([*argv, "--run.name=t2", f"--data.eval_path={tmp_path}/val"], capsys)
    assert code == 2 and err.startswith("error: data.eval_path") and err.count("\n") == 1, err
    assert not (tmp_path / "runs/t2/last.pt").exists()
