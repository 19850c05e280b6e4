"""What every file-backed dataset shares: (image, label) pairs, label checks, an optional transform.

Readers are numpy and PIL only, so a deployed model can be scored where torch is not
installed; the training augmentation (`data.transforms`) turns their arrays into tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fakd_deploy.errors import DatasetError
from fakd_deploy.inputs import MAX_IMAGE_PIXELS, open_regular

IGNORE = 255

# (image HxWx3 uint8, mask HxW int64) -> whatever the consumer wants (arrays or tensors)
Transform = Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]


def find_root(root: str | Path | None, dataset: str) -> Path:
    """The dataset folder, or an error that names what was looked for."""
    if root is None:
        raise DatasetError(f"dataset '{dataset}' needs a root folder (data.root)")
    return require(Path(root), f"{dataset} root")


class MissingSplit(DatasetError):
    """The split asked for has no list or folder under the dataset root."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: looked for {path}")
    return path


def require_split(path: Path, what: str) -> Path:
    """Like `require`, for the file or folder that defines a split (absent: `MissingSplit`)."""
    if not path.exists():
        raise MissingSplit(f"{what} not found: looked for {path}")
    return path


def decode(path: Path) -> Image.Image:
    """A fully decoded image file, its size checked before decoding; a missing, special,
    huge, truncated or non-image file names itself."""
    with open_regular(path, "image", DatasetError) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
                image.load()
                frames = getattr(image, "n_frames", 1)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DatasetError(
                f"{path} has more than {MAX_IMAGE_PIXELS:,} pixels, the limit for an image "
                "(decoding it could take gigabytes)"
            ) from None
        except UnidentifiedImageError:  # its message names the file descriptor, not the file
            raise DatasetError(f"{path} is not a readable image: no image format Pillow reads") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetError(f"{path} is not a readable image (truncated or corrupt?): {error}") from None
    if frames > 1:
        raise DatasetError(f"{path} holds {frames} frames (an animation or a stack); give one image per file")
    return image


# What each PIL mode means, as an image (colour) and as a label (class ids). A mode that is
# not listed is refused, naming the file and the mode.
COLOUR = {"RGB", "L", "1", "P", "YCbCr"}  # read as their RGB colours
ALPHA = {"RGBA": "RGB", "LA": "L", "PA": "P", "RGBa": "RGB", "La": "L"}  # read when opaque everywhere
INDICES = {"L", "P", "1", "I", "I;16", "I;16L", "I;16B"}  # values are the class ids


def opaque(image: Image.Image, path: Path) -> Image.Image:
    """The image without its alpha band, when the alpha says nothing (opaque everywhere); a
    transparent pixel has no defined colour or class, so it is refused."""
    if image.mode not in ALPHA:
        return image
    if (np.asarray(image.getchannel("A")) != 255).any():
        raise DatasetError(
            f"{path} is a {image.mode} image with transparent pixels, whose colour or class is "
            "undefined; save it without an alpha channel"
        )
    return image.convert(ALPHA[image.mode])


def open_image(path: Path) -> Image.Image:
    """An image as the 8-bit RGB colours a model reads: grey, palette, bilevel and YCbCr
    images are converted, an alpha band must be opaque, and 16-bit, float and CMYK images
    are refused (their conversion to 8-bit RGB is a choice the user must make)."""
    image = decode(path)
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette's transparent entry: colours with alpha
    image = opaque(image, path)
    if image.mode not in COLOUR:
        raise DatasetError(
            f"{path} is a {image.mode} image; images are read as 8-bit RGB: convert it "
            "(16-bit, float and CMYK images have no single conversion)"
        )
    return image.convert("RGB")


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(open_image(path))


def read_indices(path: Path) -> np.ndarray:
    """Class ids of a label PNG; palette PNGs give their indices, never their colours.

    Single-channel labels (8, 16 or 32 bits) are ids as stored; an RGB label whose three
    channels agree is read as grey; an alpha band must be opaque everywhere.
    """
    image = opaque(decode(path), path)
    if image.mode == "RGB":
        channels = np.asarray(image)
        if (channels != channels[..., :1]).any():
            raise DatasetError(
                f"{path}: the label is a colour image; save class ids as a single-channel or palette PNG"
            )
        return channels[..., 0].astype(np.int64)
    if image.mode not in INDICES:
        raise DatasetError(
            f"{path} is a {image.mode} label; labels must hold class ids: a single-channel "
            "(8 or 16-bit), palette or grey RGB PNG"
        )
    return np.asarray(image).astype(np.int64)


def check_labels(mask: np.ndarray, num_classes: int, source: Any, ignore_index: int = IGNORE) -> None:
    """Labels must be class ids in [0, num_classes) or the ignore label."""
    bad = (mask != ignore_index) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(mask[bad])[:8])
        raise DatasetError(
            f"{source}: label value(s) {values} outside [0, {num_classes}) "
            f"and not the ignore label {ignore_index}"
        )


class SegmentationDataset:
    """Pairs of image and label files; subclasses find the pairs and say how labels map to ids.

    `ds[i]` is (HxWx3 uint8 RGB, HxW int64 with `ignore_index` where unlabelled), or what
    `transform` makes of that pair. Readers mark unlabelled pixels with 255; a recipe's
    `data.ignore_index` moves them to another value.
    """

    def __init__(
        self,
        files: list[tuple[Path, Path]],
        class_names: list[str],
        transform: Transform | None = None,
        ignore_index: int = IGNORE,
    ) -> None:
        if not files:
            raise DatasetError(f"{type(self).__name__}: no image/label pairs were found")
        if 0 <= ignore_index < len(class_names):
            raise DatasetError(
                f"ignore_index {ignore_index} is a class id of this dataset "
                f"(0..{len(class_names) - 1}); pick a value outside that range"
            )
        self.files = files
        self.class_names = list(class_names)
        self.transform = transform
        self.ignore_index = ignore_index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def read_mask(self, path: Path) -> np.ndarray:
        """Train ids of one label file (unlabelled = 255); datasets with other values override."""
        return read_indices(path)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.files[index]
        image, mask = read_rgb(image_path), self.read_mask(label_path)
        if self.ignore_index != IGNORE:
            mask = np.where(mask == IGNORE, self.ignore_index, mask)
        check_labels(mask, self.num_classes, label_path, self.ignore_index)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                f"{label_path}: label size {mask.shape} differs from the size "
                f"{image.shape[:2]} of its image {image_path}"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        return (image, mask) if self.transform is None else self.transform(image, mask)
