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




# -- the compact index (issue 17 item 5) ------------------------------------------------------------------------------
def _reference_list(lines):
    """What the per-line parser gives (the pre-numpy implementation, line by line), ids by sorted path."""
    from pipeline.dataset import _parse_list_line

    entries = dict(p for ln in lines if (p := _parse_list_line(ln)) is not None)
    paths = sorted(entries)
    return paths, [entries[p] for p in paths]


def test_numpy_list_parser_equals_the_line_parser(tmp_path):
    import random

    from pipeline import dataset

    rng = random.Random(0)
    tricky = ["a/x y.jpg 4", "b/é.png 5", "b/日本.jpg", "c/z.JPEG\t7", "a/-1.jpg -1", "a/12 ", "# comment", "",
              "   ", "  c/q.jpg 2", "c/w.jpg 1\r", "c/v.jpg  9", "c/u.jpg +5", "c/007.jpg 007", "c/neg.jpg -0",
              "c/lab 12x.jpg", "c/long.jpg 0000000000000000000000012", "c/~.jpg 3"]
    plain = [f"k{rng.randrange(50):03d}/{i:06d}.jpg" + (f" {rng.randrange(-3, 1000)}" if i % 3 else "")
             for i in range(3000)]
    lines = tricky + plain
    rng.shuffle(lines)
    (tmp_path / "list.txt").write_text("\n".join(lines))  # no final newline
    dataset._EXIST_SAMPLE, saved = 0, dataset._EXIST_SAMPLE  # the files do not exist: check none
    try:
        old_chunk, dataset._CHUNK_BYTES = dataset._CHUNK_BYTES, 4096  # many blocks, lines cut at block ends
        idx = read_file_list(tmp_path / "list.txt")
    finally:
        dataset._EXIST_SAMPLE, dataset._CHUNK_BYTES = saved, old_chunk
    paths, labels = _reference_list(ln.rstrip("\r") if ln.endswith("1\r") else ln for ln in lines)
    assert idx.paths == paths and idx.labels.tolist() == labels


def test_path_table_is_a_compact_sequence(id_folder):
    import pickle

    from pipeline.dataset import PathTable

    a = scan_folder(id_folder)
    assert isinstance(a.paths, PathTable) and a.paths.nbytes < 40 * len(a)
    assert a.paths == tuple(a.paths) and list(a.paths[3:6]) == [a.paths[i] for i in range(3, 6)]
    assert a.paths[-1] == a.paths[len(a) - 1] and a.paths[np.int64(2)] == "class_0/img_002.jpg"
    assert a.paths.index("class_1/img_030.jpg") == 30 and "class_1/img_030.jpg" in a.paths and "x" not in a.paths
    assert pickle.loads(pickle.dumps(a.paths)) == a.paths and a.subset(5).paths == tuple(a.paths)[:5]
    t = PathTable.from_strings(["b/é.png", "a/日本.jpg"])
    assert list(t) == ["b/é.png", "a/日本.jpg"] and t.index("a/日本.jpg") == 1
    with pytest.raises(IndexError):
        a.paths[len(a)]


def test_file_list_existence_is_checked_on_a_sample(tmp_path):
    from pipeline import dataset

    (tmp_path / "img").mkdir()
    names = [f"img/{i:05d}.jpg" for i in range(3000)]
    for n in names[:1] + names[2:]:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    assert len(read_file_list(tmp_path / "list.txt")) == 3000  # 00001 is missing but not among the 1,024 checked
    assert dataset._EXIST_SAMPLE < 3000
    with pytest.raises(DataError, match="1024 file.*checked .*do not exist under .*nowhere"):
        read_file_list(tmp_path / "list.txt", root=tmp_path / "nowhere")


def test_a_file_name_that_is_not_utf8_is_indexed_and_read(tmp_path):
    """Older folders hold Latin-1 names: os.scandir hands them over with surrogate escapes; the compact index must
    keep them byte for byte (the path must open) and the manifest must write them."""
    import os

    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "a.jpg")
    Image.new("RGB", (8, 8)).save(os.fsdecode(os.fsencode(tmp_path / "c") + b"/caf\xe9.jpg"))
    idx = load_index(tmp_path)
    assert len(idx) == 2 and os.path.isfile(idx.abspath(1))
    idx.write_manifest(tmp_path / "m.tsv")
    assert b"caf\xe9.jpg" in (tmp_path / "m.tsv").read_bytes()
