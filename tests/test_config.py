import json

import pytest

from config import Config, ConfigError, apply_overrides, from_dict, parse_args, to_dict
from plan import resolve


def test_defaults_are_the_paper_recipe():
    c = Config()
    assert c.pic.temperature == 0.2 and c.pic.init_std == 0.01 and c.model.dim == 128
    assert c.optim.momentum == 0.9 and c.optim.weight_decay == 1e-4 and c.optim.lr == 0.03
    assert c.aug.crop_scale == (0.08, 1.0) and c.aug.jitter == (0.8, 0.8, 0.8, 0.2)
    assert (c.aug.jitter_p, c.aug.gray_p, c.aug.blur_p) == (0.8, 0.2, 0.5)
    assert (c.data.window, c.data.stride, c.pic.k) == (131072, 16384, 65536)


def test_command_line_overrides_and_types():
    c = parse_args(["--optim.lr=0.1", "--data.batch_size", "64", "--aug.crop_scale=0.2,1", "--model.compile=true"])
    assert c.optim.lr == 0.1 and c.data.batch_size == 64 and c.aug.crop_scale == (0.2, 1.0) and c.model.compile


@pytest.mark.parametrize("arg,pattern", [
    ("--optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("--optimz.lr=0.1", "unknown config section 'optimz'"),
    ("--optim.lr=fast", "optim.lr: expected"),
    ("--data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("--model.arch=vgg", "model.arch: 'vgg' is not one of"),
    ("--model.compile=maybe", "model.compile: expected true/false"),
    ("--preset=nope", "unknown preset"),
])
def test_bad_keys_and_types_are_errors_naming_the_key(arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args([arg])


def test_yaml_file_with_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.2\n  bn_wd: 0\n")
    with pytest.raises(ConfigError, match=r"optim.bn_wd.*c.yaml"):
        parse_args([f"--config={f}"])
    f.write_text("optim:\n  lr: 0.2\n")
    assert parse_args([f"--config={f}", "--preset=demo"]).optim.lr == 0.2  # file beats preset
    assert parse_args([f"--config={f}", "--optim.lr=0.3"]).optim.lr == 0.3  # command line beats file


def test_config_dict_round_trip_is_json():
    c = parse_args(["--preset=demo", "--optim.epochs=7"])
    d = json.loads(json.dumps(to_dict(c)))
    assert to_dict(from_dict(d)) == to_dict(c)


def test_resolve_scales_lr_and_counts_windows():
    c = Config()
    apply_overrides(c, {"data.batch_size": 512, "data.scheduler": "window"})
    r = resolve(c, 1_281_167)
    assert r.lr == pytest.approx(0.06)
    assert r.num_units == 1955 and r.steps_per_unit == 256  # spec oracle 6: 200 epochs -> 1955 windows
    apply_overrides(c, {"data.batch_size": 10_000_000})
    with pytest.raises(ConfigError, match="smaller than data.batch_size"):
        resolve(c, 1_281_167)


@pytest.mark.parametrize("k", [0, -3])
def test_a_k_below_one_is_a_one_line_error_before_any_work(tmp_path, capsys, k):
    import train

    assert train.main([f"--pic.k={k}", "--pic.negatives=recent", f"--run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: pic.k={k}: the number of recent negatives must be at least 1"]
    assert not (tmp_path / "pic").exists()  # refused before the data were indexed or anything written


def test_bank_cache_on_without_recent_negatives_is_a_one_line_error(tmp_path, capsys):
    import train

    assert train.main(["--pic.bank_cache=on", f"--run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pic.bank_cache=on") and "pic.negatives=recent" in err[0]
    assert train.main(["--pic.bank_cache=maybe", f"--run.out_dir={tmp_path}"]) == 2
    assert "pic.bank_cache" in capsys.readouterr().err


def test_k_covering_every_instance_is_one_note_of_a_full_softmax():
    c = Config()
    apply_overrides(c, {"pic.negatives": "recent", "pic.k": 5000, "data.batch_size": 16})
    notes = [n for n in resolve(c, 1000).notes if "pic.k" in n]
    assert notes == ["note: pic.k=5000 covers all 1000 instances: pic.negatives=recent is the full soft-max over "
                     "every row here (as pic.negatives=full)"]
    assert not [n for n in resolve(c, 5001).notes if "pic.k" in n]
    apply_overrides(c, {"pic.negatives": "full"})
    assert not [n for n in resolve(c, 1000).notes if "pic.k" in n]


def test_bank_file_that_cannot_be_a_bank_folder_is_a_clear_error(tmp_path, capsys):
    import torch
    from conftest import tiny_config

    import train
    from model.bank import BankFileError
    from model.trainer import build_trainer

    # with the device bank the folder would do nothing: refused before any work, in one line
    assert train.main(["--pic.bank_file=/tmp/somewhere", f"--run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pic.bank_storage=device it does nothing" in err[0], err
    a_file = tmp_path / "bank.bin"
    a_file.write_bytes(b"precious")
    for storage in ("mmap", "host"):
        cfg = tiny_config("", str(tmp_path), pic={"bank_storage": storage, "bank_file": str(a_file)})
        with pytest.raises(ConfigError, match=r"bank\.bin is a file, not a folder"):
            build_trainer(cfg, 64, torch.device("cpu"))
    assert a_file.read_bytes() == b"precious"
    cfg = tiny_config("", str(tmp_path), pic={"bank_storage": "mmap", "bank_file": str(a_file / "bank")})
    with pytest.raises(BankFileError, match=r"the bank cannot be made there \(Not a directory"):
        build_trainer(cfg, 64, torch.device("cpu"))
