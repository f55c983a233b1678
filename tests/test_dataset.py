import numpy as np
import pytest
from PIL import Image

from pipeline.dataset import DataError, load_index, read_file_list, scan_folder
from pipeline.decode import CorruptImageError, decode_rgb


def test_ids_are_sorted_relative_paths_and_stable(id_folder):
    a = scan_folder(id_folder)
    b = scan_folder(str(id_folder) + "/")
    assert a.paths == b.paths
    assert list(a.paths) == sorted(a.paths)
    assert a.paths[0] == "class_0/img_000.jpg"
    assert a.classes == ("class_0", "class_1")
    assert a.labels.tolist() == [0] * 24 + [1] * 24


def test_manifest_round_trip_gives_same_ids(id_folder, tmp_path):
    a = scan_folder(id_folder)
    a.write_manifest(tmp_path / "manifest.tsv")
    lines = (tmp_path / "manifest.tsv").read_text().splitlines()
    assert lines[0] == "instance_id\tlabel\tpath"
    assert lines[1] == "0\t0\tclass_0/img_000.jpg"
    b = read_file_list(tmp_path / "manifest.tsv", root=id_folder)
    assert b.paths == a.paths and (b.labels == a.labels).all()


def test_shuffled_file_list_gets_the_folder_ids(id_folder, tmp_path):
    a = scan_folder(id_folder)
    rng = np.random.default_rng(0)
    lines = [f"{p} {y}" for p, y in zip(a.paths, a.labels.tolist(), strict=True)]
    rng.shuffle(lines)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    b = read_file_list(tmp_path / "list.txt", root=id_folder)
    assert b.paths == a.paths and (b.labels == a.labels).all()


def test_missing_and_empty_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist: .*nope"):
        load_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found under .*empty"):
        scan_folder(tmp_path / "empty")


def test_file_list_with_missing_file_is_an_error(tmp_path):
    (tmp_path / "list.txt").write_text("a/missing.jpg 0\n")
    with pytest.raises(DataError, match="missing.jpg"):
        read_file_list(tmp_path / "list.txt")


def test_non_images_and_empty_files_are_skipped_and_listed(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "ok.JPEG")
    (tmp_path / "c" / "notes.txt").write_text("hello")
    (tmp_path / "c" / "zero.jpg").write_bytes(b"")
    idx = scan_folder(tmp_path)
    assert idx.paths == ("c/ok.JPEG",)
    assert idx.skipped == ("c/notes.txt", "c/zero.jpg")


def test_decode_handles_real_world_quirks(tmp_path):
    Image.new("CMYK", (9, 7), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (5, 5), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("RGB", (6, 6), (0, 200, 0)).save(tmp_path / "png_inside.JPEG", format="PNG")
    Image.fromarray(np.full((4, 4), 60000, np.uint16)).save(tmp_path / "deep.png")
    Image.new("P", (3, 3), 7).save(tmp_path / "pal.png")
    Image.new("L", (1, 1), 9).save(tmp_path / "one.jpg")
    im = Image.new("RGB", (20, 10), (1, 2, 3))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_rgb(str(tmp_path / "cmyk.jpg")).mode == "RGB"
    assert decode_rgb(str(tmp_path / "rgba.png")).getpixel((2, 2)) == (255, 255, 255)  # transparent -> white
    assert decode_rgb(str(tmp_path / "png_inside.JPEG")).getpixel((0, 0)) == (0, 200, 0)
    deep = decode_rgb(str(tmp_path / "deep.png"))
    assert deep.mode == "RGB" and 225 < deep.getpixel((0, 0))[0] <= 255
    assert decode_rgb(str(tmp_path / "pal.png")).mode == "RGB"
    assert decode_rgb(str(tmp_path / "one.jpg")).size == (1, 1)
    assert decode_rgb(str(tmp_path / "rot.jpg")).size == (10, 20)


def test_corrupt_files_raise_a_named_error(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:100])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("trunc.jpg", "text.jpg"):
        with pytest.raises(CorruptImageError, match=name):
            decode_rgb(str(tmp_path / name))


