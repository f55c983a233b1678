"""Every input works or is refused in one line: each numeric key out of its range, a run folder that cannot be
made, broken config files, no arguments, misleading causes (a folder of bad images, a folder given to the ffcv
backend, a missing eval_path, a file list with class names), and a run whose losses end non-finite."""

from __future__ import annotations

import os

import pytest
from conftest import write_id_folder
from PIL import Image

import config
import train
from pipeline import backend_unavailable
from pipeline.dataset import DataError, load_index

# (command-line argument, what the one error line must say): every numeric key of config.py out of its range
OUT_OF_RANGE = [
    ("--data.batch_size=0", "data.batch_size=0: must be at least 1"),
    ("--data.workers=-1", "data.workers=-1: must be at least 0"),
    ("--data.image_size=0", "data.image_size=0: must be at least 1"),
    ("--data.eval_size=0", "data.eval_size=0: must be at least 1"),
    ("--data.eval_size=-5", "data.eval_size=-5: must be at least 1"),
    ("--data.window=0", "data.window=0: must be at least 1"),
    ("--data.stride=0", "data.stride=0: must be at least 1"),
    ("--data.subset=-1", "data.subset=-1: must be 0 (all) or at least 1"),
    ("--aug.crop_scale=0,1", "aug.crop_scale=0,1: must be in (0, 1], the first at most the second"),
    ("--aug.crop_scale=0.5,0.2", "aug.crop_scale=0.5,0.2: must be in (0, 1], the first at most the second"),
    ("--aug.crop_ratio=0,1", "aug.crop_ratio=0,1: must be greater than 0, the first at most the second"),
    ("--aug.flip_p=1.5", "aug.flip_p=1.5: must be in [0, 1]"),
    ("--aug.jitter=0.8,-1,0.8,0.2", "aug.jitter=0.8,-1,0.8,0.2: the contrast must be at least 0"),
    ("--aug.jitter=0.8,0.8,0.8,0.6", "the hue (at most half the colour circle) must be in [0, 0.5]"),
    ("--aug.jitter_p=-0.1", "aug.jitter_p=-0.1: must be in [0, 1]"),
    ("--aug.gray_p=2", "aug.gray_p=2: must be in [0, 1]"),
    ("--aug.blur_p=-1", "aug.blur_p=-1: must be in [0, 1]"),
    ("--aug.blur_sigma=0,2", "aug.blur_sigma=0,2: must be greater than 0, the first at most the second"),
    ("--aug.small_crops=-1", "aug.small_crops=-1: must be at least 0"),
    ("--aug.small_size=0", "aug.small_size=0: must be at least 1"),
    ("--aug.small_scale=0.1,1.5", "aug.small_scale=0.1,1.5: must be in (0, 1], the first at most the second"),
    ("--model.head_hidden=0", "model.head_hidden=0: must be at least 1"),
    ("--model.dim=0", "model.dim=0: must be at least 1"),
    ("--model.bn_groups=0", "model.bn_groups=0: must be at least 1"),
    ("--pic.temperature=0", "pic.temperature=0: the soft-max temperature must be greater than 0"),
    ("--pic.temperature=-0.2", "pic.temperature=-0.2: the soft-max temperature must be greater than 0"),
    ("--pic.init_std=0", "pic.init_std=0: must be greater than 0"),
    ("--pic.k=0", "pic.k=0: the number of recent negatives must be at least 1"),
    ("--optim.epochs=-1", "optim.epochs=-1: must be at least 1"),
    ("--optim.epochs=0", "optim.epochs=0: must be at least 1"),
    ("--optim.warmup_epochs=-2", "optim.warmup_epochs=-2: must be -1 (epochs/40) or at least 0"),
    ("--optim.lr=-1", "optim.lr=-1: must be greater than 0"),
    ("--optim.lr=Infinity", "optim.lr=inf: must be greater than 0"),
    ("--optim.min_lr=-1e-6", "optim.min_lr=-1e-06: must be at least 0"),
    ("--optim.momentum=1", "optim.momentum=1: must be in [0, 1)"),
    ("--optim.weight_decay=-1", "optim.weight_decay=-1: must be at least 0"),
    ("--optim.max_nonfinite=0", "optim.max_nonfinite=0: must be at least 1"),
    ("--run.seed=-1", "run.seed=-1: must be in [0, 9223372036854775807]"),
    ("--run.log_every=0", "run.log_every=0: must be at least 1"),
    ("--run.ckpt_every=-1", "run.ckpt_every=-1: must be 0 (off) or at least 1"),
    ("--run.ckpt_minutes=-1", "run.ckpt_minutes=-1: must be 0 (off) or greater than 0"),
    ("--run.max_steps=-1", "run.max_steps=-1: must be 0 (to the end) or at least 1"),
    ("--run.knn_k=0", "run.knn_k=0: must be at least 1"),
    ("--run.monitor_every=-2", "run.monitor_every=-2: must be -1 (auto) or 0 (off) or at least 1"),
    ("--run.monitor_images=0", "run.monitor_images=0: must be at least 1"),
    ("--run.threads=-1", "run.threads=-1: must be 0 (auto) or at least 1"),
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def _inputs(tmp_path):
    """(arguments, what the line must say) of the rows that need files: run folders and config files."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # no write permission (root ignores it: that row then checks a path under a file)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("optim:\n  lr: [0.1\n")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"optim": {"lr": 0.1,}}')
    section = tmp_path / "section.yaml"
    section.write_text("optim: 5\n")
    unwritable = locked if os.geteuid() != 0 else a_file / "sub"
    return {
        "out_dir_is_a_file": ([f"--run.out_dir={a_file}"], f"run.out_dir={a_file}: the run folder"),
        "out_dir_cannot_be_made": ([f"--run.out_dir={unwritable}/x"], f"run.out_dir={unwritable}/x: the run folder"),
        "broken_yaml": ([f"--config={broken_yaml}"], f"config file {broken_yaml} is not valid YAML: line 3"),
        "broken_json": ([f"--config={broken_json}"], f"config file {broken_json} is not valid JSON: line 1"),
        "section_not_a_mapping": ([f"--config={section}"], "config section 'optim'"),
    }


FILE_ROWS = ["out_dir_is_a_file", "out_dir_cannot_be_made", "broken_yaml", "broken_json", "section_not_a_mapping"]


@pytest.mark.parametrize("row", [a for a, _ in OUT_OF_RANGE] + FILE_ROWS)
def test_every_bad_value_is_one_error_line_naming_the_key_and_its_range(row, id_folder, tmp_path, capsys):
    """Exit 2, one `error:` line, no traceback, nothing made: in-process, so the whole table takes seconds. (The
    other keys make a tiny one-step run, so a value that were not refused would end quickly.)"""
    if row in FILE_ROWS:
        args, says = _inputs(tmp_path)[row]
    else:
        args, says = [row], dict(OUT_OF_RANGE)[row]
    out = tmp_path / "runs"
    rc = train.main(_tiny_args(id_folder, tmp_path, "--data.batch_size=8", "--run.max_steps=1", *args))
    line = _one_error_line(capsys)
    assert rc == 2 and says in line, line
    assert not out.exists()  # refused before anything was made


def test_the_table_has_a_row_for_every_numeric_key():
    """A new numeric key needs a range in config.RANGES (importing config fails without) and a row above."""
    tested = {a.split("=")[0].removeprefix("--") for a, _ in OUT_OF_RANGE}
    assert tested == set(config._numeric_keys()) == set(config.RANGES)


def test_no_arguments_is_a_one_line_hint_and_trains_nothing(monkeypatch, capsys):
    def no_training(cfg):
        raise AssertionError("train.py with no arguments started a run")

    monkeypatch.setattr(train, "train", no_training)
    assert train.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("usage: ") and "--data.path=" in err and "--preset=demo" in err


def test_data_workers_default_to_the_cores_of_this_process(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert config.Config().data.workers == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more processes than cores: one each
    assert config.Config().data.workers == 1


# ---------------------------------------------------------------------------------------------------------------
# misleading causes: each message names the real one and the way on
# ---------------------------------------------------------------------------------------------------------------

def _tiny_args(folder, tmp_path, *extra):
    return [f"--data.path={folder}", "--data.workers=0", "--data.image_size=16", "--model.arch=tiny",
            "--model.head_hidden=32", "--model.dim=16", "--optim.epochs=1", "--run.eval=none", "--run.device=cpu",
            "--run.monitor_every=0", f"--run.out_dir={tmp_path / 'runs'}", *extra]


def test_a_folder_of_only_bad_images_smaller_than_the_batch_says_no_image_decodes(tmp_path, capsys):
    folder = tmp_path / "bad" / "class_0"
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"img_{i}.jpg").write_bytes(b"not a jpeg" * (i + 1))
    assert train.main(_tiny_args(tmp_path / "bad", tmp_path, "--data.batch_size=16")) == 2
    line = _one_error_line(capsys)
    assert "no decodable image in data.path=" in line and "larger" not in line, line


def test_a_folder_given_to_the_ffcv_backend_says_how_to_convert_it(tmp_path, capsys):
    folder = write_id_folder(tmp_path / "d", n=8, classes=1)
    assert train.main(_tiny_args(folder, tmp_path, "--data.backend=ffcv")) == 2
    line = _one_error_line(capsys)
    assert f"python -m pipeline.convert_ffcv {folder} OUT.beton" in line or backend_unavailable("ffcv"), line


def test_a_missing_eval_path_names_the_key_before_any_training(tmp_path, capsys):
    folder = write_id_folder(tmp_path / "d", n=16, classes=2)
    missing = tmp_path / "no_such_val"
    assert train.main(_tiny_args(folder, tmp_path, "--data.batch_size=8", f"--data.eval_path={missing}")) == 2
    assert _one_error_line(capsys) == f"error: data.eval_path={missing} does not exist (it must be an image folder " \
                                      f"or a file list)"
    assert not (tmp_path / "runs" / "pic" / "log.jsonl").exists()


def test_a_file_list_with_class_names_takes_them_as_labels_in_sorted_order(tmp_path):
    folder = write_id_folder(tmp_path / "d", n=8, classes=2)
    lst = folder / "list.txt"
    lst.write_text("class_1/img_004.jpg dog\nclass_0/img_000.jpg\tcat\nclass_1/img_005.jpg dog\n"
                   "class_0/img_001.jpg cat\nclass_0/img_002.jpg\n")
    index = load_index(lst)
    assert list(index.paths) == ["class_0/img_000.jpg", "class_0/img_001.jpg", "class_0/img_002.jpg",
                                 "class_1/img_004.jpg", "class_1/img_005.jpg"]
    assert index.labels.tolist() == [0, 0, -1, 1, 1] and index.classes == ("cat", "dog")
    lst.write_text("class_0/img_000.jpg cat\nclass_1/img_004.jpg 1\n")
    with pytest.raises(DataError, match="labels must be all integers or all class names"):
        load_index(lst)
    # a last word that is an image name is part of the path (a path with a space), not a class
    (folder / "my photos").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "my photos" / "a b.jpg")
    lst.write_text("my photos/a b.jpg\n")
    index = load_index(lst)
    assert list(index.paths) == ["my photos/a b.jpg"] and index.labels.tolist() == [-1]


# ---------------------------------------------------------------------------------------------------------------
# a run that did not train never exits 0
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "says"), [
    # a tiny temperature: a finite first loss, an update that overflows, then only NaN (fewer than max_nonfinite)
    (["--pic.temperature=1e-30"], "the run ended with 5 non-finite loss(es) in a row"),
    (["--optim.lr=1e30", "--optim.max_nonfinite=3"], "loss was non-finite 3 times in a row"),
])
def test_a_run_whose_final_losses_are_non_finite_exits_1_in_one_line(tmp_path, capsys, extra, says):
    folder = write_id_folder(tmp_path / "d", n=48, classes=1)
    rc = train.main(_tiny_args(folder, tmp_path, "--data.batch_size=8", "--run.name=nan", *extra))
    line = _one_error_line(capsys)
    assert rc == 1 and says in line, line
    run = tmp_path / "runs" / "nan"
    assert (run / "last.pt").exists() and not (run / "backbone.pt").exists() and not (run / "results.json").exists()
