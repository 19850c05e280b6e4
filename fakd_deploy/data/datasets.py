"""Readers for the public benchmarks and for a user's own folders.

Each class knows its folder layout and its label mapping; nothing outside this file needs
to know which dataset it is reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from fakd_deploy.data.base import (
    IGNORE,
    DatasetError,
    MissingSplit,
    SegmentationDataset,
    Transform,
    find_root,
    read_indices,
    require,
    require_split,
)
from fakd_deploy.inputs import MAX_LIST_BYTES, MAX_YAML_BYTES, class_names_problem, load_yaml, read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def listed_pairs(root: Path, listing: Path) -> list[tuple[Path, Path]]:
    """`image label` pairs, one per line, relative to root (the SegNet/CamVid list format).

    Each path stays inside the root (a `../val/x.png` in a train list would leak validation
    images into training), and each pair is listed once."""
    pairs: dict[tuple[Path, Path], int] = {}
    text = read_list(require_split(listing, "split list")).removeprefix("\ufeff")  # a BOM
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line.split()) != 2:
            raise DatasetError(f"{listing}: line {number} ({line!r}) must name an image and its label")
        image, label = (Path(part.lstrip("/")) for part in line.split())
        if ".." in image.parts or ".." in label.parts:
            raise DatasetError(f"{listing}: line {number} ({line!r}) leads outside the dataset folder {root}")
        if (image, label) in pairs:
            raise DatasetError(f"{listing}: line {number} repeats line {pairs[image, label]} ({line!r})")
        pairs[image, label] = number
    if not pairs:
        raise DatasetError(f"{listing} lists no image/label pairs")
    return [(root / image, root / label) for image, label in pairs]


class CamVid(SegmentationDataset):
    """CamVid at 360x480 in the 11-class SegNet version; label 11 is void."""

    CLASS_NAMES: ClassVar[list[str]] = [
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    ]
    VOID = 11

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        root = find_root(root, "camvid")
        super().__init__(listed_pairs(root, root / f"{split}.txt"), self.CLASS_NAMES, transform, ignore_index)

    def read_mask(self, path: Path) -> np.ndarray:
        raw = read_indices(path)
        return np.where(raw == self.VOID, IGNORE, raw)


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: `*_labelTrainIds.png` where present, else label ids mapped here."""

    CLASS_NAMES: ClassVar[list[str]] = [
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    TRAIN_IDS: ClassVar[dict[int, int]] = {
        7: 0,
        8: 1,
        11: 2,
        12: 3,
        13: 4,
        17: 5,
        19: 6,
        20: 7,
        21: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        31: 16,
        32: 17,
        33: 18,
    }

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        root = find_root(root, "cityscapes")
        images = sorted(
            require_split(root / "leftImg8bit" / split, "Cityscapes split").glob("*/*_leftImg8bit.png")
        )
        pairs = [(image, self.label_for(root, split, image)) for image in images]
        super().__init__(pairs, self.CLASS_NAMES, transform, ignore_index)
        self.lookup = np.full(256, IGNORE, dtype=np.int64)
        self.lookup[list(self.TRAIN_IDS)] = list(self.TRAIN_IDS.values())

    @staticmethod
    def label_for(root: Path, split: str, image: Path) -> Path:
        folder = root / "gtFine" / split / image.parent.name
        stem = image.name.removesuffix("_leftImg8bit.png")
        train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
        if train_ids.exists():
            return train_ids
        return require(folder / f"{stem}_gtFine_labelIds.png", "Cityscapes label")

    def read_mask(self, path: Path) -> np.ndarray:
        raw = read_indices(path)
        if path.name.endswith("_labelTrainIds.png"):
            return raw
        return self.lookup[np.clip(raw, 0, 255)]


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing: 150 classes; label 0 ("other") is ignored, the rest shift down by one."""

    CLASS_NAMES: ClassVar[list[str]] = [
        "wall",
        "building",
        "sky",
        "floor",
        "tree",
        "ceiling",
        "road",
        "bed",
        "windowpane",
        "grass",
        "cabinet",
        "sidewalk",
        "person",
        "earth",
        "door",
        "table",
        "mountain",
        "plant",
        "curtain",
        "chair",
        "car",
        "water",
        "painting",
        "sofa",
        "shelf",
        "house",
        "sea",
        "mirror",
        "rug",
        "field",
        "armchair",
        "seat",
        "fence",
        "desk",
        "rock",
        "wardrobe",
        "lamp",
        "bathtub",
        "railing",
        "cushion",
        "base",
        "box",
        "column",
        "signboard",
        "chest of drawers",
        "counter",
        "sand",
        "sink",
        "skyscraper",
        "fireplace",
        "refrigerator",
        "grandstand",
        "path",
        "stairs",
        "runway",
        "case",
        "pool table",
        "pillow",
        "screen door",
        "stairway",
        "river",
        "bridge",
        "bookcase",
        "blind",
        "coffee table",
        "toilet",
        "flower",
        "book",
        "hill",
        "bench",
        "countertop",
        "stove",
        "palm",
        "kitchen island",
        "computer",
        "swivel chair",
        "boat",
        "bar",
        "arcade machine",
        "hovel",
        "bus",
        "towel",
        "light",
        "truck",
        "tower",
        "chandelier",
        "awning",
        "streetlight",
        "booth",
        "television receiver",
        "airplane",
        "dirt track",
        "apparel",
        "pole",
        "land",
        "bannister",
        "escalator",
        "ottoman",
        "bottle",
        "buffet",
        "poster",
        "stage",
        "van",
        "ship",
        "fountain",
        "conveyer belt",
        "canopy",
        "washer",
        "plaything",
        "swimming pool",
        "stool",
        "barrel",
        "basket",
        "waterfall",
        "tent",
        "bag",
        "minibike",
        "cradle",
        "oven",
        "ball",
        "food",
        "step",
        "tank",
        "trade name",
        "microwave",
        "pot",
        "animal",
        "bicycle",
        "lake",
        "dishwasher",
        "screen",
        "blanket",
        "sculpture",
        "hood",
        "sconce",
        "vase",
        "traffic light",
        "tray",
        "ashcan",
        "fan",
        "pier",
        "crt screen",
        "plate",
        "monitor",
        "bulletin board",
        "shower",
        "radiator",
        "glass",
        "clock",
        "flag",
    ]
    FOLDERS: ClassVar[dict[str, str]] = {
        "train": "training",
        "val": "validation",
        "training": "training",
        "validation": "validation",
    }

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        root = find_root(root, "ade20k")
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in self.FOLDERS:
            raise MissingSplit(f"ADE20K split must be one of {', '.join(self.FOLDERS)}, not '{split}'")
        folder = self.FOLDERS[split]
        images = sorted(require_split(root / "images" / folder, "ADE20K split").glob("*.jpg"))
        labels = require(root / "annotations" / folder, "ADE20K annotations")
        pairs = [(image, labels / f"{image.stem}.png") for image in images]
        super().__init__(pairs, self.CLASS_NAMES, transform, ignore_index)

    def read_mask(self, path: Path) -> np.ndarray:
        raw = read_indices(path)
        return np.where(raw == 0, IGNORE, raw - 1)


class PascalVOC(SegmentationDataset):
    """PASCAL VOC 2012: 21 classes, 255 marks object boundaries (ignored).

    `augmented=True` reads the SBD-augmented labels of `SegmentationClassAug` and the
    `{split}_aug.txt` list where there is one (the usual 10,582-image `train_aug`).
    """

    CLASS_NAMES: ClassVar[list[str]] = [
        "background",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ]

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
        augmented: bool = False,
    ) -> None:
        root = find_root(root, "voc")
        if (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        lists = root / "ImageSets" / "Segmentation"
        listing = lists / f"{split}.txt"
        if augmented and (lists / f"{split}_aug.txt").exists():
            listing = lists / f"{split}_aug.txt"
        labels = root / ("SegmentationClassAug" if augmented else "SegmentationClass")
        names = read_list(require_split(listing, "VOC split list")).split()
        pairs = [(root / "JPEGImages" / f"{n}.jpg", labels / f"{n}.png") for n in names]
        super().__init__(pairs, self.CLASS_NAMES, transform, ignore_index)


class Folder(SegmentationDataset):
    """A user's own data, laid out as `images/`, `masks/` and `classes.yaml`.

    `classes.yaml` is a list of class names; a mask pairs with the image of the same stem.
    With `images/{split}` and `masks/{split}` subfolders each split reads its own; without
    them every split reads the same images.
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        root = find_root(root, "folder")
        class_names = read_class_names(root / "classes.yaml")
        images, masks = split_folders(root, split)
        by_stem = one_per_stem(masks, "mask")
        pairs = []
        for stem, image in one_per_stem(images, "image").items():
            if stem not in by_stem:
                raise DatasetError(f"{image} has no mask: looked for {masks / stem}.*")
            pairs.append((image, by_stem[stem]))
        if not pairs:
            raise DatasetError(f"{images} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        super().__init__(pairs, class_names, transform, ignore_index)


def one_per_stem(folder: Path, what: str) -> dict[str, Path]:
    """The images of a folder by stem, in name order; two files of one stem (`a.png` and
    `a.jpg`) would make which one is read an accident of the file system, so it is refused."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if path.stem in found:
            raise DatasetError(
                f"{found[path.stem]} and {path.name} are two {what}s named {path.stem}: keep one"
            )
        found[path.stem] = path
    return found


def read_class_names(path: Path) -> list[str]:
    text = read_text(require(path, "class list"), "class list", MAX_YAML_BYTES, DatasetError)
    names = load_yaml(text, str(path), DatasetError)
    problem = class_names_problem(names)
    if problem:
        raise DatasetError(f"{path} {problem}")
    return list(names)


def read_list(path: Path) -> str:
    """A split list: a regular text file of at most MAX_LIST_BYTES."""
    return read_text(path, "split list", MAX_LIST_BYTES, DatasetError)


def split_folders(root: Path, split: str) -> tuple[Path, Path]:
    """`images/{split}` and `masks/{split}` when the data is split into subfolders, else the two roots."""
    images, masks = require(root / "images", "image folder"), require(root / "masks", "mask folder")
    entries = sorted(images.iterdir())
    folders = [p.name for p in entries if p.is_dir()]
    loose = [p.name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if folders and loose:
        raise DatasetError(
            f"{images} holds images ({loose[0]}, ...) and folders ({', '.join(folders[:3])}): "
            "give each split its own folder (images/train, images/val), or use no folders"
        )
    if folders:
        return (
            require_split(images / split, "image split folder"),
            require(masks / split, "mask split folder"),
        )
    return images, masks
