"""A resume trains on the data the run started on: the run's own manifest.tsv gives the ids; files renamed,
replaced or gone since are replaced like undecodable ones and named in bad_files.tsv; files added are left out
with a note; a manifest that does not belong to the checkpoint is refused, naming the paths that differ."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import decode_ids, id_color, no_aug, tiny_config, write_id_folder
from PIL import Image

import model.step
import train
from pipeline import backend_unavailable
from pipeline.dataset import DataError, PathTable
from pipeline.digest import digest_difference, index_digest
from pipeline.manifest import match_paths

B, N = 8, 48  # 6 steps per epoch


def _config(folder, out, **run):
    return no_aug(tiny_config(str(folder), str(out), data={"backend": "torch", "workers": 0, "batch_size": B},
                              optim={"epochs": 2, "warmup_epochs": 1}, run={"name": "r", **run}))


def _record_batches(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(ids, the ids their pixels encode) of every training step from now on."""
    seen = []
    step = model.step.TrainStep.__call__

    def spy(self, images, ids, *args, **kwargs):
        seen.append((ids.tolist(), decode_ids(images).tolist()))
        return step(self, images, ids, *args, **kwargs)

    monkeypatch.setattr(model.step.TrainStep, "__call__", spy)
    return seen


def _rename(d):
    os.replace(d / "img_005.jpg", d / "img_zzz.jpg")  # sorts last: a fresh scan would shift ids 5..46
    return {5: "gone since the run started"}


def _replace(d):
    f = d / "img_007.jpg"
    mtime = f.stat().st_mtime_ns
    Image.new("RGB", (40, 40), id_color(30)).save(f, quality=95)  # another image under the same name
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))  # (written within the same second as the original)
    return {7: "replaced since the run started"}


def _vanish(d):
    (d / "img_040.jpg").unlink()  # N - 1 files: the checkpoint's N used to refuse the resume
    return {40: "gone since the run started"}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("change", [_rename, _replace, _vanish], ids=["rename", "replace", "vanish"])
def test_a_resume_after_the_folder_changed_trains_every_id_on_its_own_pixels(change, tmp_path, monkeypatch, capsys):
    folder = write_id_folder(tmp_path / "d", n=N, classes=1)
    assert train.train(_config(folder, tmp_path, max_steps=3))["step"] == 3
    run = tmp_path / "r"
    manifest = (run / "manifest.tsv").read_bytes()
    bad = change(folder / "class_0")
    seen = _record_batches(monkeypatch)
    out = train.train(_config(folder, tmp_path, resume="auto"))
    printed = capsys.readouterr().out
    assert out["steps"] == 2 * N // B and len(seen) == out["steps"] - 3  # the planned steps, from the checkpoint
    for ids, pixels in seen:  # no bank row is trained on pixels that are not its image
        assert ids == pixels
        assert not set(ids) & set(bad)
    listed = [line.split("\t") for line in (run / "bad_files.tsv").read_text().splitlines()[1:]]
    assert [(int(i), p) for i, p, _ in listed] == [(i, f"class_0/img_{i:03d}.jpg") for i in bad]
    assert all(why in reason for (_, _, reason), why in zip(listed, bad.values(), strict=True))
    assert (run / "manifest.tsv").read_bytes() == manifest  # the run's index is never rewritten
    if change is _rename:
        assert "1 file(s) added since the run started are not trained on" in printed and "img_zzz" in printed


def test_a_manifest_that_does_not_belong_to_the_checkpoint_is_refused_naming_the_paths(tmp_path, capsys):
    folder = write_id_folder(tmp_path / "d", n=N, classes=1)
    train.train(_config(folder, tmp_path, max_steps=2))
    manifest = tmp_path / "r" / "manifest.tsv"
    manifest.write_text(manifest.read_text().replace("img_010.jpg", "img_010b.jpg"))  # not the trained index
    with pytest.raises(DataError, match=r"does not belong to the checkpoint \(instance 10 is 'class_0/img_010b.jpg' "
                                        r"in the manifest but 'class_0/img_010.jpg' in the checkpoint\)"):
        train.train(_config(folder, tmp_path, resume="auto"))
    manifest.unlink()  # and without a manifest, a folder that changed cannot stand in for it
    (folder / "class_0" / "img_003.jpg").unlink()
    with pytest.raises(DataError, match=r"manifest.tsv \(the run's instance index\) is missing and data.path=.* is "
                                        r"not the data the checkpoint was trained on \(instance 3 is "):
        train.train(_config(folder, tmp_path, resume="auto"))


def test_a_resume_on_data_that_hold_few_of_the_runs_files_unchanged_is_refused(tmp_path):
    folder = write_id_folder(tmp_path / "d", n=N, classes=1)
    train.train(_config(folder, tmp_path, max_steps=2))
    other = tmp_path / "other"
    other.mkdir()
    for i in range(N):  # the same number of images, other names
        Image.new("RGB", (40, 40), id_color(i)).save(other / f"x_{i:03d}.jpg")
    cfg = _config(other, tmp_path, resume="auto")
    with pytest.raises(DataError, match=f"data.path={other} holds 0 of the 48 files of .* unchanged"):
        train.train(cfg)
    (other / "class_0").mkdir()
    for i in range(N // 2 - 1):  # 23 of the run's own files (mtimes kept), the rest other images under its names
        shutil.copy2(folder / "class_0" / f"img_{i:03d}.jpg", other / "class_0")
    for i in range(N // 2 - 1, N):
        os.replace(other / f"x_{i:03d}.jpg", other / "class_0" / f"img_{i:03d}.jpg")
    with pytest.raises(DataError, match=f"data.path={other} holds 23 of the 48 files of .* unchanged \\(e.g. "
                                        f"'class_0/img_023.jpg' is replaced\\)"):
        train.train(cfg)


def test_path_matching_and_digests_against_python_references():
    rng = random.Random(1)
    alphabet = ["a", "b", "é", "日", "/", ".jpg", "0", "z"]
    universe = sorted({"".join(rng.choices(alphabet, k=rng.randrange(1, 7))) for _ in range(3000)})
    a = sorted(rng.sample(universe, 1200))
    b = sorted(rng.sample(universe, 1500))
    pos = match_paths(PathTable.from_strings(a), PathTable.from_strings(b))
    where = {p: j for j, p in enumerate(b)}
    assert pos.tolist() == [where.get(p, -1) for p in a]
    assert match_paths(PathTable.from_strings(a), PathTable.from_strings([])).tolist() == [-1] * len(a)
    # above 4,096 paths a digest keeps one hash per block: a difference is placed within its block
    big = [f"k/{i:06d}.jpg" for i in range(5000)]  # blocks of 2
    saved = index_digest(PathTable.from_strings(big))
    assert saved["block"] == 2 and len(saved["blocks"]) == 2500
    assert digest_difference(saved, PathTable.from_strings(big)) == ""
    moved = big[:3001] + ["k/003001b.jpg"] + big[3002:]
    assert digest_difference(saved, PathTable.from_strings(moved)) == (
        "they part within instances 3000..3001 (the manifest's 'k/003000.jpg' on; the checkpoint keeps one hash per "
        "2 paths)")
    assert "instance 3000 is 'k/003001.jpg' in the manifest but 'k/003000.jpg'" in digest_difference(
        saved, PathTable.from_strings(big[:3000] + big[3001:]))
    assert digest_difference(saved, PathTable.from_strings(big[:4000])).startswith("the manifest has 4,000 paths")
    # the digest is of the paths, in their order and with their boundaries
    assert index_digest(PathTable.from_strings(["ab", "c"]))["digest"] != \
        index_digest(PathTable.from_strings(["a", "bc"]))["digest"]
    assert isinstance(saved["blocks"], torch.Tensor) and saved["blocks"].dtype == torch.int64
    assert np.asarray(saved["blocks"]).shape == (2500,)


@pytest.mark.timeout(240)
@pytest.mark.skipif(bool(backend_unavailable("ffcv")), reason=backend_unavailable("ffcv"))
def test_an_ffcv_resume_on_a_beton_of_other_data_is_refused_naming_the_instance(tmp_path):
    from pipeline.convert_ffcv import ConvertSettings, convert

    folder = write_id_folder(tmp_path / "d", n=24, classes=1)
    beton = str(tmp_path / "d.beton")
    settings = ConvertSettings(max_resolution=40, write_mode="raw", workers=1)
    convert(str(folder), beton, settings)
    cfg = tiny_config(beton, str(tmp_path), data={"backend": "ffcv", "batch_size": B, "workers": 1},
                      run={"name": "f", "max_steps": 2})
    train.train(cfg)
    (folder / "class_0" / "img_004.jpg").unlink()  # converted again: ids 4.. now name other images
    convert(str(folder), beton, settings, force=True)
    cfg.run.max_steps, cfg.run.resume = 0, "auto"
    with pytest.raises(DataError, match=r"is not the data the run started on: instance 4 is 'class_0/img_005.jpg' "
                                        r"there but 'class_0/img_004.jpg' in .*manifest.tsv"):
        train.train(cfg)


def _resumed_index(folder, tmp_path, **data):
    """Train 2 steps, then the index a resume of that run trains on (train.build_index, as a resume calls it)."""
    cfg = _config(folder, tmp_path, max_steps=2)
    cfg.data.subset = data.get("subset", 0)
    assert train.train(cfg)["step"] == 2
    change = data.get("change")
    if change:
        change()
    cfg = _config(folder, tmp_path, resume="auto")
    cfg.data.subset = data.get("subset", 0)
    return train.build_index(cfg, train.find_resume_checkpoint(cfg, tmp_path / "r"))


def test_a_class_folder_added_before_a_resume_keeps_every_label_on_its_class_name(tmp_path):
    """A new class folder that sorts first renumbers a fresh scan's classes; the resumed index keeps the run's own
    label numbers and their names (the kNN and the monitor pair labels by name)."""
    folder = write_id_folder(tmp_path / "d", n=24, classes=2)

    def add_class():
        (folder / "0_new").mkdir()
        shutil.copy(folder / "class_0" / "img_000.jpg", folder / "0_new" / "x.jpg")

    index, resumed = _resumed_index(folder, tmp_path, change=add_class)
    assert index.classes == ("class_0", "class_1")
    for i in range(len(index)):
        assert index.classes[index.labels[i]] == index.paths[i].split("/")[0]


def test_files_added_before_a_subset_resume_are_not_called_gone(tmp_path):
    """data.subset takes the first files in path order: files added since that sort before them must not push the
    run's own files out of a new subset and be called gone (they are still there)."""
    folder = write_id_folder(tmp_path / "d", n=N, classes=1)

    def add_early():
        for k in range(4):
            shutil.copy(folder / "class_0" / "img_000.jpg", folder / "class_0" / f"img_00{k}a.jpg")

    index, resumed = _resumed_index(folder, tmp_path, subset=24, change=add_early)
    assert len(index) == 24 and not resumed.bad
