"""The numbers a user publishes: the linear probe scores what it trained, the warm-up follows the schedule, the
multi-crop preset is the paper's, a changed schedule cannot be resumed, and outputs load where users load them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

import train
from config import Config, apply_overrides, parse_args
from eval import knn, linear
from eval.features import extract
from model.checkpoint import CheckpointError
from pipeline.augment import BatchColorAugment, view_specs
from pipeline.dataset import scan_folder
from plan import resolve


class ShiftedBN(nn.Module):
    """A backbone whose output depends only on BN running statistics in eval mode (images are ~N(0.5, σ))."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.bn(x)).flatten(1)


def test_linear_probe_scores_the_model_it_trained(id_folder):
    index = scan_folder(id_folder)
    backbone = ShiftedBN()
    out = linear.linear_probe(backbone, index, index, 16, torch.device("cpu"), epochs=2, lr=1.0, batch_size=16,
                              bn="train", workers=0)
    assert backbone.bn.running_mean.abs().sum() > 0  # linear training in BN-train mode moved the statistics
    after, _, _ = extract(backbone.eval(), index, 16, torch.device("cpu"), workers=0)
    torch.testing.assert_close(out["val_features"], after)  # validated with them, not the pre-training ones


def test_warm_up_defaults_to_epochs_over_40():
    for epochs, warm in ((200, 5), (400, 10), (1600, 40)):
        cfg = apply_overrides(Config(), {"optim": {"epochs": epochs}, "data": {"batch_size": 256}})
        res = resolve(cfg, 256 * 10)
        assert res.warmup_steps == warm * res.steps_per_unit
    cfg = apply_overrides(Config(), {"optim": {"epochs": 200, "warmup_epochs": 3}})
    assert resolve(cfg, 2560).warmup_steps == 3 * resolve(cfg, 2560).steps_per_unit


def test_multicrop_preset_is_the_papers_recipe():
    cfg = parse_args(["--preset=multicrop"])
    assert view_specs(cfg.aug, cfg.data.image_size) == [(160, (0.14, 1.0))] + [(96, (0.08, 0.14))] * 3
    # the blur's sigma is in pixels of the crop, the same for the small crops (it used to shrink by 96/224)
    assert BatchColorAugment(cfg.aug, 96).sigma == BatchColorAugment(cfg.aug, 160).sigma == (0.1, 2.0)
    assert cfg.data.eval_size == 224


@pytest.mark.parametrize(("key", "value"), [("optim.epochs", 3), ("optim.lr", 0.2), ("data.batch_size", 8),
                                            ("optim.warmup_epochs", 0.5)])
def test_resume_with_a_changed_schedule_is_refused_naming_the_key(id_folder, tmp_path, key, value):
    train.train(tiny_config(str(id_folder), str(tmp_path), run={"max_steps": 2}))
    section, name = key.split(".")
    changed = tiny_config(str(id_folder), str(tmp_path), run={"resume": "auto"}, **{section: {name: value}})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        train.train(changed)


def test_eval_clis_take_backbone_pt_and_reject_other_files_in_one_line(digits_root, tmp_path, capsys):
    from eval.common import run_cli

    train.train(tiny_config(str(digits_root / "train"), str(tmp_path), data={"subset": 64},
                            optim={"epochs": 1, "warmup_epochs": 0}))
    common = ["--train", str(digits_root / "train"), "--val", str(digits_root / "val"), "--workers", "0",
              "--size", "16"]
    assert run_cli(knn.main, ["--ckpt", str(tmp_path / "t" / "backbone.pt"), *common]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    for bad in (junk, tmp_path / "missing.pt", tmp_path / "t" / "manifest.tsv"):
        assert run_cli(knn.main, ["--ckpt", str(bad), *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and "weights_only" not in err, err


def test_eval_names_undecodable_images(digits_root, tmp_path, capsys):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(digits_root / "val", val)
    broken = sorted(val.rglob("*.jpg"))[0]
    broken.write_bytes(b"garbage")
    from model.backbone import make_backbone

    extract(make_backbone("tiny")[0].eval(), scan_folder(val), 16, torch.device("cpu"), workers=0)
    assert "1 undecodable image(s)" in capsys.readouterr().out


def test_the_final_evaluation_names_undecodable_images_once_per_folder(tmp_path, capsys):
    """Retrieval and kNN decode the training images, and the random-init baseline decodes everything again: the
    note of each folder still comes once."""
    from conftest import write_id_folder

    from eval.final import evaluate_run
    from model.pic import build_pic
    from pipeline.dataset import load_index

    train_dir, val_dir = write_id_folder(tmp_path / "tr", n=16), write_id_folder(tmp_path / "va", n=8)
    (train_dir / "class_0" / "img_003.jpg").write_bytes(b"garbage")
    (val_dir / "class_1" / "img_005.jpg").write_bytes(b"garbage")
    cfg = tiny_config(str(train_dir), str(tmp_path), data={"eval_path": str(val_dir)}, run={"eval": "auto"})
    index = load_index(train_dir)
    model = build_pic("tiny", head_hidden=32, dim=16)
    results = evaluate_run(cfg, model, index, torch.device("cpu"))
    assert "knn_top1" in results and "retrieval_top1_random_init" in results
    out = capsys.readouterr().out
    assert out.count("undecodable image(s)") == 2, out
    assert out.count(f"1 undecodable image(s) of {train_dir} left out") == 1
    assert out.count(f"1 undecodable image(s) of {val_dir} left out") == 1


def test_help_explains_every_key_with_its_default():
    from config import field_docs, help_text

    text = help_text()
    docs = field_docs()
    from dataclasses import fields

    for sec in fields(Config):
        for f in fields(getattr(Config(), sec.name)):
            key = f"{sec.name}.{f.name}"
            assert docs.get(key), f"{key} has no comment beside it in config.py"
            assert f"--{key}=" in text
    assert "--pic.negatives=full [full | recent]" in text
    assert "--help" not in linear.main.__doc__ if linear.main.__doc__ else True


def test_linear_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        linear.main(["--help"])
    assert "(default: 30.0)" in capsys.readouterr().out


def test_resume_compares_the_schedule_by_effect(id_folder, tmp_path):
    """warmup_epochs=-1 means epochs/40: a run saved with the explicit value resumes with the default."""
    train.train(tiny_config(str(id_folder), str(tmp_path), optim={"epochs": 40, "warmup_epochs": 1},
                            run={"max_steps": 2}))
    out = train.train(tiny_config(str(id_folder), str(tmp_path), optim={"epochs": 40, "warmup_epochs": -1},
                                  run={"max_steps": 1, "resume": "auto"}))
    assert out["step"] == 3
    ckpt = torch.load(tmp_path / "t" / "last.pt", weights_only=True)
    assert ckpt["meta"]["plan"] == {"steps_per_unit": 3, "total_steps": 120, "warmup_steps": 3,
                                    "order": "global-permutation-v2"}  # the epoch order's generator
