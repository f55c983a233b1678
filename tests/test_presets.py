"""`--preset=imagenet`: the recommended ImageNet run is one flag, with the paper's two system ideas switched on."""

from config import Config, parse_args, to_dict
from plan import resolve

IMAGENET_N = 1_281_167  # ImageNet-1k's training images


def test_imagenet_preset_is_the_paper_recipe_with_window_and_recent_negatives():
    c = parse_args(["--preset=imagenet"])
    assert (c.data.scheduler, c.data.window, c.data.stride, c.data.batch_size) == ("window", 131072, 16384, 256)
    assert (c.pic.negatives, c.pic.k, c.pic.correction, c.pic.temperature) == ("recent", 65536, "exact", 0.2)
    assert (c.model.arch, c.model.dim, c.optim.epochs, c.optim.lr) == ("resnet50", 128, 200, 0.03)
    # the two system ideas are what the preset adds to the defaults
    assert (Config().data.scheduler, Config().pic.negatives) == ("epoch", "full")


def test_imagenet_preset_plans_the_papers_windows():
    # docs/method.md §3: ceil(200·N/W) = 1,955 windows of W/B = 512 steps; warm-up ceil(5·N/W) = 49 windows
    r = resolve(parse_args(["--preset=imagenet"]), IMAGENET_N)
    assert (r.num_units, r.steps_per_unit, r.total_steps) == (1955, 512, 1955 * 512)
    assert r.warmup_steps == 49 * 512


def test_imagenet_and_multicrop_presets_combine_in_either_order():
    a = to_dict(parse_args(["--preset=imagenet", "--preset=multicrop"]))
    b = to_dict(parse_args(["--preset=multicrop", "--preset=imagenet"]))
    assert a == b
    assert a["data"]["image_size"] == 160 and a["aug"]["small_crops"] == 3 and a["data"]["scheduler"] == "window"


def test_command_line_beats_the_preset():
    assert parse_args(["--preset=imagenet", "--pic.k=4096"]).pic.k == 4096
