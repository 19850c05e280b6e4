"""File-backed datasets: CamVid on disk, tiny fake trees of the other layouts, errors, `data check`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from fakd_deploy.data import DATASETS, DatasetError, MissingSplit, build_dataset
from fakd_deploy.data.check import summarize, summary_tables
from fakd_deploy.data.preprocess import Normalise, ValTransform
from fakd_deploy.data.transforms import TrainTransform


def write_image(path: Path, height: int = 4, width: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(path)


def write_label(path: Path, values: list[int], mode: str = "L", width: int = 6) -> np.ndarray:
    """A label whose rows cycle through `values`; a palette PNG when mode is "P"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.resize(np.repeat(np.array(values, dtype=np.uint8), width), (4, width))
    image = Image.new(mode, (width, 4))
    image.putdata(label.ravel().tolist())
    if mode == "P":
        image.putpalette([(7 * i) % 256 for i in range(768)])
    image.save(path)
    return label.astype(np.int64)


def test_registry_names() -> None:
    assert set(DATASETS) == {"synthetic", "camvid", "cityscapes", "ade20k", "voc", "folder"}


def test_camvid_splits_shapes_and_void(camvid: Path) -> None:
    train, val = build_dataset("camvid", camvid, "train"), build_dataset("camvid", camvid, "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.num_classes == 11 and train.ignore_index == 255
    assert train.class_names[0] == "Sky" and train.class_names[-1] == "Bicyclist"
    image, mask = train[0]
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert mask.shape == (360, 480) and mask.dtype == np.int64
    raw = np.asarray(Image.open(train.files[0][1]))
    assert set(np.unique(mask)) <= set(range(11)) | {255}
    np.testing.assert_array_equal(mask == 255, raw == 11)


def test_camvid_with_transforms(camvid: Path) -> None:
    normalise = Normalise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ds = build_dataset("camvid", camvid, "val", transform=ValTransform(normalise, (96, 128)))
    image, mask = ds[0]
    assert image.dtype == np.float32 and image.shape == (3, 96, 128)
    assert mask.dtype == np.int64 and mask.shape == (96, 128)
    train = TrainTransform((64, 64), (0.5, 1.0), True, 0.2, normalise.mean, normalise.std, 255.0, 255)
    image_t, mask_t = build_dataset("camvid", camvid, "train", transform=train)[0]
    assert image_t.dtype == torch.float32 and image_t.shape == (3, 64, 64)
    assert mask_t.dtype == torch.int64 and mask_t.shape == (64, 64)


def test_ignore_index_moves_unlabelled_pixels(camvid: Path) -> None:
    raw = build_dataset("camvid", camvid, "val")[0][1]
    moved = build_dataset("camvid", camvid, "val", ignore_index=250)[0][1]
    np.testing.assert_array_equal(moved == 250, raw == 255)
    assert not (moved == 255).any()
    with pytest.raises(DatasetError, match="ignore_index 3 is a class id"):
        build_dataset("camvid", camvid, "val", ignore_index=3)


def test_cityscapes_maps_label_ids_and_prefers_train_ids(tmp_path: Path) -> None:
    city = "aachen"
    for stem in ("aachen_000000_000019", "aachen_000001_000019"):
        write_image(tmp_path / "leftImg8bit/train" / city / f"{stem}_leftImg8bit.png")
    gt = tmp_path / "gtFine/train" / city
    write_label(gt / "aachen_000000_000019_gtFine_labelIds.png", [7, 26, 0, 33])
    write_label(gt / "aachen_000001_000019_gtFine_labelIds.png", [7, 7, 7, 7])
    write_label(gt / "aachen_000001_000019_gtFine_labelTrainIds.png", [5, 255, 18, 0])
    ds = build_dataset("cityscapes", tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19
    assert ds[0][1][:, 0].tolist() == [0, 13, 255, 18]
    assert ds[1][1][:, 0].tolist() == [5, 255, 18, 0]


def test_ade20k_ignores_zero_and_shifts(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    write_image(ade / "images/validation/ADE_val_00000001.jpg")
    write_label(ade / "annotations/validation/ADE_val_00000001.png", [0, 1, 150, 3])
    for root in (tmp_path, ade):
        ds = build_dataset("ade20k", root, "val")
        assert len(ds) == 1 and ds.num_classes == 150 == len(ds.class_names)
        assert ds[0][1][:, 0].tolist() == [255, 0, 149, 2]


def test_voc_reads_palette_indices_and_keeps_255(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit/VOC2012"
    write_image(voc / "JPEGImages/2007_000032.jpg")
    write_label(voc / "SegmentationClass/2007_000032.png", [0, 15, 255, 1], mode="P")
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    ds = build_dataset("voc", tmp_path / "VOCdevkit", "train")
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    assert ds[0][1][:, 0].tolist() == [0, 15, 255, 1]


def test_voc_augmented_labels_and_list(tmp_path: Path) -> None:
    write_image(tmp_path / "JPEGImages/a.jpg")
    write_image(tmp_path / "JPEGImages/b.jpg")
    write_label(tmp_path / "SegmentationClassAug/a.png", [3])
    write_label(tmp_path / "SegmentationClassAug/b.png", [4])
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (tmp_path / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\n")
    ds = build_dataset("voc", tmp_path, "train", augmented=True)
    assert [int(ds[i][1][0, 0]) for i in range(len(ds))] == [3, 4]


def make_folder(root: Path, split: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text("- sky\n- road\n- car\n")
    write_image(root / "images" / split / "x1.jpg")
    write_label(root / "masks" / split / "x1.png", [0, 2, 255, 1])


def test_folder_pairs_by_stem_with_and_without_splits(tmp_path: Path) -> None:
    make_folder(tmp_path / "flat")
    ds = build_dataset("folder", tmp_path / "flat", "train")
    assert ds.class_names == ["sky", "road", "car"] and ds.num_classes == 3
    image, mask = ds[0]
    assert image.shape == (4, 6, 3) and mask[:, 0].tolist() == [0, 2, 255, 1]
    make_folder(tmp_path / "split", "val")
    assert len(build_dataset("folder", tmp_path / "split", "val")) == 1
    with pytest.raises(MissingSplit, match="train"):
        build_dataset("folder", tmp_path / "split", "train")


def test_folder_image_without_mask_names_it(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_image(tmp_path / "images/lonely.png")
    with pytest.raises(DatasetError, match="lonely"):
        build_dataset("folder", tmp_path, "train")


def test_a_folder_dataset_that_pairs_by_accident_is_refused(tmp_path: Path) -> None:
    """Two files of one stem, loose images beside split folders, an empty split: named."""
    make_folder(tmp_path / "twins")
    write_image(tmp_path / "twins/images/x1.png")
    with pytest.raises(DatasetError, match=r"x1\.jpg and x1\.png are two images named x1: keep one"):
        build_dataset("folder", tmp_path / "twins", "train")
    make_folder(tmp_path / "masks")
    write_label(tmp_path / "masks/masks/x1.bmp", [0, 1, 2, 0])
    with pytest.raises(DatasetError, match=r"x1\.bmp and x1\.png are two masks named x1"):
        build_dataset("folder", tmp_path / "masks", "train")
    make_folder(tmp_path / "stray")
    (tmp_path / "stray/images/old").mkdir()
    with pytest.raises(DatasetError, match=r"holds images \(x1\.jpg, \.\.\.\) and folders \(old\)"):
        build_dataset("folder", tmp_path / "stray", "train")
    make_folder(tmp_path / "empty", "train")
    (tmp_path / "empty/images/val").mkdir()
    (tmp_path / "empty/masks/val").mkdir()
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'empty/images/val'} holds no images"):
        build_dataset("folder", tmp_path / "empty", "val")


def test_data_check_reports_the_real_error_of_a_split(tmp_path: Path) -> None:
    """A missing mask is the error, not 'no split found'."""
    make_folder(tmp_path)
    write_image(tmp_path / "images/img3.png")
    with pytest.raises(DatasetError, match=r"img3\.png has no mask"):
        summarize("folder", tmp_path)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    make_folder(tmp_path)
    image = tmp_path / "images/x1.jpg"
    image.write_bytes(image.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"x1\.jpg is not a readable image \(truncated or corrupt\?\)"):
        build_dataset("folder", tmp_path, "train")[0]


def test_a_file_that_is_no_image_names_itself_not_a_descriptor(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "images/x1.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError) as error:
        build_dataset("folder", tmp_path, "train")[0]
    assert (
        str(error.value)
        == f"{tmp_path / 'images/x1.jpg'} is not a readable image: no image format Pillow reads"
    )


def test_out_of_range_label_names_file_and_value(tmp_path: Path) -> None:
    make_folder(tmp_path)
    write_label(tmp_path / "masks/x1.png", [0, 7])
    ds = build_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"x1\.png.* 7 ") as error:
        ds[0]
    assert error.value.exit_code == 2


def test_colour_label_is_refused(tmp_path: Path) -> None:
    make_folder(tmp_path)
    Image.fromarray(np.dstack([np.zeros((4, 6)), np.ones((4, 6)), np.zeros((4, 6))]).astype(np.uint8)).save(
        tmp_path / "masks/x1.png"
    )
    with pytest.raises(DatasetError, match="colour"):
        build_dataset("folder", tmp_path, "train")[0]


@pytest.mark.parametrize("name", ["camvid", "cityscapes", "ade20k", "voc", "folder"])
def test_missing_root_names_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "absent"))):
        build_dataset(name, tmp_path / "absent", "train")


def test_missing_split_names_path(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(MissingSplit, match=re.escape(str(tmp_path / "test.txt"))):
        build_dataset("camvid", tmp_path, "test")
    (tmp_path / "leftImg8bit/train").mkdir(parents=True)
    with pytest.raises(MissingSplit, match=re.escape(str(tmp_path / "leftImg8bit" / "val"))):
        build_dataset("cityscapes", tmp_path, "val")


@pytest.mark.parametrize(
    ("listing", "named"),
    [
        ("", "train.txt lists no image/label pairs"),
        (
            "a.png b.png\n../val/x.png ../valannot/x.png\n",
            "line 2 ('../val/x.png ../valannot/x.png') leads outside",
        ),
        ("a.png b.png\nc.png d.png\na.png b.png\n", "line 3 repeats line 1 ('a.png b.png')"),
        ("a.png b.png extra\n", "line 1 ('a.png b.png extra') must name an image and its label"),
        ("a.png\n", "line 1 ('a.png') must name an image and its label"),
    ],
)
def test_a_split_list_is_read_within_its_folder_and_each_pair_once(
    tmp_path: Path, listing: str, named: str
) -> None:
    """Before: `../` paths were followed out of the root (train/val leakage), repeated and extra
    columns were taken silently, and an empty list named no file."""
    (tmp_path / "train.txt").write_text(listing)
    with pytest.raises(DatasetError, match=re.escape(named)):
        build_dataset("camvid", tmp_path, "train")


def test_a_split_list_with_a_byte_order_mark_reads_its_first_path(tmp_path: Path) -> None:
    from fakd_deploy.data.datasets import listed_pairs

    (tmp_path / "train.txt").write_text("\ufeffa.png b.png\r\nc.png d.png\r\n", encoding="utf-8")
    assert listed_pairs(tmp_path, tmp_path / "train.txt") == [
        (tmp_path / "a.png", tmp_path / "b.png"),
        (tmp_path / "c.png", tmp_path / "d.png"),
    ]


def test_bad_name_option_or_root() -> None:
    with pytest.raises(DatasetError, match="camvid"):
        build_dataset("camvidd", "x", "train")
    with pytest.raises(DatasetError, match=r"colour.*num_classes"):
        build_dataset("synthetic", None, "train", colour=3)
    with pytest.raises(DatasetError, match=r"remove data\.root"):
        build_dataset("synthetic", "somewhere", "train")
    with pytest.raises(DatasetError, match="root"):
        build_dataset("camvid", None, "train")


def test_summary_counts_sizes_and_frequencies(tmp_path: Path) -> None:
    make_folder(tmp_path, "train")
    make_folder(tmp_path, "val")
    summary = summarize("folder", tmp_path)
    assert set(summary["splits"]) == {"train", "val"}
    train = summary["splits"]["train"]
    assert train["count"] == 1 and train["sizes"] == {(4, 6): 1}
    assert train["classes"] == pytest.approx({"sky": 6 / 18, "road": 6 / 18, "car": 6 / 18})
    assert train["ignore"] == pytest.approx(0.25)
    console = Console(file=io.StringIO(), width=120)
    for table in summary_tables(summary):
        console.print(table)
    text = console.file.getvalue()
    assert "4x6: 1" in text and "road" in text and "25.0%" in text


def test_summary_of_nothing_names_root(tmp_path: Path) -> None:
    (tmp_path / "classes.yaml").write_text("- a\n")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        summarize("camvid", tmp_path)


def save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


GREY = np.arange(24, dtype=np.uint8).reshape(4, 6)
OPAQUE = np.full((4, 6), 255, dtype=np.uint8)


@pytest.mark.parametrize(
    "mode, make, image, label",
    [
        ("RGB", lambda: Image.fromarray(np.dstack([GREY] * 3)), "grey", "ids"),
        ("L", lambda: Image.fromarray(GREY), "grey", "ids"),
        ("1", lambda: Image.fromarray(GREY > 10), "bilevel", "bilevel"),
        ("LA opaque", lambda: Image.fromarray(np.dstack([GREY, OPAQUE]), "LA"), "grey", "ids"),
        ("LA transparent", lambda: Image.fromarray(np.dstack([GREY, GREY]), "LA"), "refused", "refused"),
        ("RGBA opaque", lambda: Image.fromarray(np.dstack([GREY] * 3 + [OPAQUE]), "RGBA"), "grey", "ids"),
        ("RGBA transparent", lambda: Image.fromarray(np.dstack([GREY] * 4), "RGBA"), "refused", "refused"),
        ("I;16", lambda: Image.fromarray(GREY.astype(np.uint16) * 1000), "refused", "ids x 1000"),
    ],
)
def test_each_image_mode_means_one_thing(tmp_path: Path, mode: str, make, image: str, label: str) -> None:
    """What a mode means as an image (8-bit RGB colours) and as a label (class ids); what is
    ambiguous (16-bit colour, transparency) is refused naming the file and the mode."""
    from fakd_deploy.data.base import read_indices, read_rgb

    path = save(make(), tmp_path / "x.png")
    expected = {
        "grey": np.dstack([GREY] * 3),
        "bilevel": np.dstack([np.where(GREY > 10, 255, 0)] * 3),
        "ids": GREY,
        "ids x 1000": GREY.astype(np.int64) * 1000,
    }
    expected["bilevel ids"] = (GREY > 10).astype(np.int64)
    for reader, want in ((read_rgb, image), (read_indices, label if label != "bilevel" else "bilevel ids")):
        if want == "refused":
            with pytest.raises(DatasetError, match=rf"x\.png.*{mode.split()[0]}"):
                reader(path)
        else:
            np.testing.assert_array_equal(reader(path), expected[want])


@pytest.mark.parametrize("kind", ["cmyk", "animation", "float"])
def test_images_without_one_meaning_are_refused_by_name(tmp_path: Path, kind: str) -> None:
    from fakd_deploy.data.base import read_indices, read_rgb

    if kind == "cmyk":
        path = save(Image.new("CMYK", (6, 4)), tmp_path / "x.jpg")
    elif kind == "animation":
        frames = [Image.fromarray(np.full((4, 6), 40 * i, np.uint8)).convert("RGB") for i in range(3)]
        path = tmp_path / "x.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:])
    else:
        path = save(Image.fromarray(GREY.astype(np.float32)), tmp_path / "x.tif")
    for reader in (read_rgb, read_indices):
        with pytest.raises(DatasetError, match=r"x\.(jpg|gif|tif)"):
            reader(path)


def test_an_opaque_la_label_is_read_not_called_a_size_mismatch(tmp_path: Path) -> None:
    """Before: an LA label was read as H x W x 2 and reported as a size mismatch."""
    make_folder(tmp_path)
    ids = np.resize(np.array([0, 2, 255, 1], dtype=np.uint8), (6, 4)).T
    save(Image.fromarray(np.dstack([ids, np.full((4, 6), 255, np.uint8)]), "LA"), tmp_path / "masks/x1.png")
    _, mask = build_dataset("folder", tmp_path, "train")[0]
    np.testing.assert_array_equal(mask, ids.astype(np.int64))


@pytest.mark.timeout(60)
def test_a_special_file_in_a_dataset_is_named_not_read(tmp_path: Path) -> None:
    """A FIFO named like an image: before, `data check` blocked forever on it."""
    import os

    make_folder(tmp_path)
    os.mkfifo(tmp_path / "images" / "x2.png")
    write_label(tmp_path / "masks" / "x2.png", [0])
    with pytest.raises(DatasetError, match=r"x2\.png is not a regular file"):
        summarize("folder", tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "- &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"- &l{i} [*{'a' if i == 0 else f'l{i - 1}'}, *{'a' if i == 0 else f'l{i - 1}'}]\n"
                for i in range(20)
            ),
            "100,000 values",
        ),
        ("".join(f"- c{i}\n" for i in range(2000)), "limit is 1024"),
        ("[a, b]\n[c]\n", "not valid YAML"),
        ('["a", "b\\u001b[31m"]\n', r"has 'b\\x1b\[31m' at 1: a class name is text of 1-100 printable"),
        ("[sky, null, car]\n", "has None at 1: a class name is text"),
        ("[sky, {x: 1}]\n", "has {'x': 1} at 1"),
        ("[sky, 3]\n", "has 3 at 1"),
        ("[sky, '']\n", "has '' at 1"),
        ("[sky, road, sky]\n", "names 'sky' twice"),
        ("[sky, road, 'sky ']\n", "names 'sky' and 'sky ', which look alike"),
        ("[sky, '   ']\n", "has '   ' at 1"),
        ("[]\n", "is not a list of class names"),
    ],
)
def test_a_class_list_is_read_within_bounds(tmp_path: Path, text: str, message: str) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(DatasetError, match=message):
        build_dataset("folder", tmp_path, "train")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_images": 10**12}, "num_images"),
        ({"size": 100_000}, "the limit for an image"),
        ({"num_classes": 400_000_000}, "num_classes"),
    ],
)
def test_synthetic_sizes_are_bounded(options: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        build_dataset("synthetic", None, "train", **options)
