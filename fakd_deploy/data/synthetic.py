"""A procedural segmentation dataset: no files, every image made on access from (seed, split, index).

Scenes are textured shapes (ellipses, rotated rectangles, star polygons) that overlap one
another on a textured background. Classes come in pairs that share a mean colour and differ
only in texture (stripes, checker, blobs, grain), and every shape gets its own colour shift
and pixel noise. Colour alone therefore cannot tell the classes apart: a model has to read
texture over a neighbourhood, which a larger receptive field (a bigger teacher) does better.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from fakd_deploy.data.base import IGNORE, MissingSplit, Transform
from fakd_deploy.errors import DatasetError
from fakd_deploy.inputs import MAX_CLASSES, MAX_IMAGE_PIXELS

TEXTURES = ("stripes", "checker", "blobs", "grain")
SHAPES = ("ellipse", "rectangle", "polygon")
TEXTURE_AMPLITUDE = 40.0
COLOUR_SHIFT = 18.0
PIXEL_NOISE = 12.0


@dataclass(frozen=True)
class Style:
    """How one class looks: a mean colour shared with its pair, and a texture of its own."""

    colour: np.ndarray
    texture: str
    period: float
    angle: float


def class_styles(num_classes: int, seed: int) -> list[Style]:
    """Classes 2k and 2k+1 share a colour; their textures differ (class c uses TEXTURES[c % 4])."""
    rng = np.random.default_rng([seed, 7919])
    colours = rng.uniform(60, 190, size=((num_classes + 1) // 2, 3)).astype(np.float32)
    return [
        Style(
            colour=colours[c // 2],
            texture=TEXTURES[c % len(TEXTURES)],
            period=float(rng.uniform(3.0, 8.0)),
            angle=float(rng.uniform(0, np.pi)),
        )
        for c in range(num_classes)
    ]


def texture(style: Style, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The class pattern in [-1, 1] at pixels (yy, xx), with a random phase per shape."""
    u = xx * np.cos(style.angle) + yy * np.sin(style.angle) + rng.uniform(0, style.period)
    v = yy * np.cos(style.angle) - xx * np.sin(style.angle) + rng.uniform(0, style.period)
    if style.texture == "stripes":
        return np.sin(2 * np.pi * u / style.period)
    if style.texture == "checker":
        return np.sign(np.sin(np.pi * u / style.period) * np.sin(np.pi * v / style.period))
    if style.texture == "blobs":
        # Three slow waves summed and thresholded: irregular blobs a few periods across.
        freq = rng.uniform(-1, 1, size=(3, 2)) * 2 * np.pi / (3 * style.period)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        return np.sign(np.sin(u[:, None] * freq[:, 0] + v[:, None] * freq[:, 1] + phase).sum(1))
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=yy.shape)


def opencv() -> ModuleType:
    """OpenCV draws the shapes; it comes with the training install, not the deploy-only one."""
    try:
        import cv2
    except ImportError:
        raise DatasetError(
            "the synthetic dataset draws its scenes with OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


def draw_shape(canvas: np.ndarray, value: int, rng: np.random.Generator) -> None:
    """Paint one random ellipse, rotated rectangle or star polygon of `value` onto the canvas."""
    cv2 = opencv()
    h, w = canvas.shape
    centre = (float(rng.uniform(0, w)), float(rng.uniform(0, h)))
    radius = rng.uniform(0.06, 0.4, size=2) * (h, w)
    angle = float(rng.uniform(0, 180))
    kind = SHAPES[rng.integers(len(SHAPES))]
    if kind == "ellipse":
        cv2.ellipse(canvas, (centre, (2 * radius[1], 2 * radius[0]), angle), value, thickness=-1)
        return
    if kind == "rectangle":
        corners = cv2.boxPoints((centre, (2 * radius[1], 2 * radius[0]), angle))
    else:
        turns = np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(5, 10)))
        reach = rng.uniform(0.4, 1.0, size=turns.size) * radius.max()
        corners = np.stack([centre[0] + reach * np.cos(turns), centre[1] + reach * np.sin(turns)], 1)
    cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], value)


SPLITS = {"train": 512, "val": 128, "test": 128}  # the splits there are, and their default sizes
MAX_IMAGES = 10_000_000  # per split: a training run draws a permutation of them each epoch


def split_size(num_images: int | dict[str, int] | None, split: str) -> int:
    """How many images `split` has under the `num_images` option."""
    if isinstance(num_images, dict):
        # YAML keys may be numbers, booleans or null: name them as given, never sort or join them raw
        unknown = [key if isinstance(key, str) else repr(key) for key in num_images if key not in SPLITS]
        if unknown:
            raise DatasetError(
                f"data.options.num_images names no split {', '.join(unknown)}: the splits are "
                f"{', '.join(SPLITS)}"
            )
        count = num_images.get(split, SPLITS[split])
    else:
        count = SPLITS[split] if num_images is None else num_images
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_IMAGES:
        raise DatasetError(
            f"data.options.num_images must be a whole number in 1..{MAX_IMAGES:,}, got {count!r}"
        )
    return count


class Synthetic:
    """Textured overlapping shapes; class 0 is the background, `num_classes` >= 6.

    There is no `root`: giving one is an error. The class styles depend on `seed` only, so
    every split draws from the same distribution; the scenes depend on (seed, split, index),
    so splits never share images. The splits are `train`, `val` and `test`: any other name
    is refused rather than silently generating a new random set. `num_images` sizes every
    split alike, or each by name (`{train: 4096, test: 512}`; the others keep their default).
    """

    def __init__(
        self,
        root: Any = None,
        split: str = "train",
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
        size: int | tuple[int, int] = 64,
        num_images: int | dict[str, int] | None = None,
        seed: int = 0,
        num_classes: int = 8,
    ) -> None:
        if root is not None:
            raise DatasetError(f"the synthetic dataset is generated, not read: remove data.root ({root})")
        if not isinstance(num_classes, int) or not 6 <= num_classes <= MAX_CLASSES:
            raise DatasetError(f"synthetic data needs num_classes in 6..{MAX_CLASSES}, got {num_classes!r}")
        if split not in SPLITS:
            raise MissingSplit(
                f"the synthetic dataset has no split '{split}': its splits are {', '.join(SPLITS)}"
            )
        if 0 <= ignore_index < num_classes:
            raise DatasetError(
                f"ignore_index {ignore_index} is a class id of the synthetic dataset "
                f"(0..{num_classes - 1}); pick a value outside that range"
            )
        self.ignore_index = ignore_index
        sides = [size, size] if not isinstance(size, list | tuple) else list(size)
        if (
            len(sides) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in sides)
            or sides[0] * sides[1] > MAX_IMAGE_PIXELS
        ):
            raise DatasetError(
                f"data.options.size must be a whole number of pixels or [height, width], at most "
                f"{MAX_IMAGE_PIXELS:,} pixels in all (the limit for an image); got {size!r}"
            )
        self.size = (sides[0], sides[1])
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise DatasetError(f"data.options.seed must be a whole number from 0, got {seed!r}")
        self.split, self.seed, self.transform = split, seed, transform
        self.count = split_size(num_images, split)
        self.styles = class_styles(num_classes, seed)
        self.yy, self.xx = np.mgrid[0 : self.size[0], 0 : self.size[1]].astype(np.float32)
        self.class_names = ["background"] + [f"{self.styles[c].texture}_{c}" for c in range(1, num_classes)]
        self.files = [f"synthetic:{split}:{i}" for i in range(self.count)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.count

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The scene for `index`; crc32 rather than hash() keeps it the same in every process."""
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), index])
        shapes = int(rng.integers(3, 9))
        classes = np.concatenate([[0], rng.integers(1, self.num_classes, size=shapes)])
        layers = np.zeros(self.size, dtype=np.uint8)
        for layer in range(1, shapes + 1):
            draw_shape(layers, layer, rng)
        pattern = np.zeros(self.size, dtype=np.float32)
        for layer, c in enumerate(classes):
            where = layers == layer
            pattern[where] = texture(self.styles[c], self.yy[where], self.xx[where], rng)
        colours = np.stack([self.styles[c].colour for c in classes])
        colours += COLOUR_SHIFT * rng.standard_normal(colours.shape, dtype=np.float32)
        image = colours[layers] + TEXTURE_AMPLITUDE * pattern[..., None]
        image += PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), classes[layers].astype(np.int64)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} is outside the {self.count} images of split '{self.split}'")
        image, mask = self.generate(index)
        return (image, mask) if self.transform is None else self.transform(image, mask)
