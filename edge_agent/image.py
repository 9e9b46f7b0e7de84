"""Image preprocessing for vision backbones, on the device: numpy only (no torch, no PIL).

The exported ViT graphs take float32 ``pixel_values`` of shape ``[batch, 3, S, S]``. The builder checks a
bundle against PyTorch, which resizes with ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``; ``ImageEncoder`` reproduces exactly that resize (half-pixel centres, edge clamp, no
antialias) so the device feeds the graphs the same numbers the bundle was checked with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, w_lo, w_hi) along one axis: ``out[j] = w_lo[j] * x[lo[j]] + w_hi[j] * x[hi[j]]``.

    PyTorch's rule for align_corners=False: the source coordinate of output pixel j is
    ``(j + 0.5) * in / out - 0.5`` (pixel centres aligned), clamped below at 0; the upper neighbour is
    clamped to the last pixel. The arithmetic follows PyTorch's float32 CPU kernel (scale rounded to
    float32, coordinate computed in double and rounded to float32, weights in float32), so the weights are
    bit-identical to PyTorch's rather than merely close. Cached because a fleet's images share a few sizes.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0, so truncation is floor
    hi = np.minimum(lo + 1, in_size - 1)
    w_hi = src - lo.astype(np.float32)
    w_lo = np.float32(1.0) - w_hi
    for a in (lo, hi, w_lo, w_hi):
        a.setflags(write=False)  # shared through the cache: nobody may change them
    return lo, hi, w_lo, w_hi


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of the last two axes of a float32 array to ``size`` x ``size``."""
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (size, size):
        return x
    lo, hi, w_lo, w_hi = _bilinear_taps(in_w, size)  # along the width first, as PyTorch does
    cols = x[..., lo] * w_lo + x[..., hi] * w_hi
    lo, hi, w_lo, w_hi = _bilinear_taps(in_h, size)
    return cols[..., lo, :] * w_lo[:, None] + cols[..., hi, :] * w_hi[:, None]


def _check_image(image: object, i: int) -> np.ndarray:
    """One image must be uint8 [H, W] or [H, W, 3] with at least one pixel."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {i} is a {type(image).__name__}, expected a numpy uint8 array")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image {i} has dtype {image.dtype}, expected uint8 pixels 0..255; "
            "convert with (x * 255).round().astype(np.uint8) if it holds floats in [0, 1]"
        )
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image {i} has shape {image.shape}, expected [H, W] (grayscale) or [H, W, 3] (RGB)")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image {i} has shape {image.shape}; it needs at least 1x1 pixels")
    return image


class ImageEncoder:
    """Turns uint8 images into the normalised NCHW float32 batch a ViT backbone takes.

    Steps, in PyTorch's order: scale to [0, 1], replicate grayscale to 3 channels, bilinear resize to
    ``image_size`` x ``image_size`` (align_corners=False, no antialias), then ``(x - mean) / std`` per
    channel. The defaults are the ImageNet statistics DINOv2 was trained with.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int (the side of the square input), got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel (3 each), got {mean} and {std}")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"mean must be finite and std finite and > 0, got {mean} and {std}")
        self.image_size = image_size
        self.mean = (float(mean[0]), float(mean[1]), float(mean[2]))
        self.std = (float(std[0]), float(std[1]), float(std[2]))
        self._mean = np.array(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.array(self.std, dtype=np.float32).reshape(1, 3, 1, 1)

    def encode(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """float32 ``[batch, 3, image_size, image_size]`` for a sequence of uint8 images.

        Images may differ in size and in channels (grayscale and RGB can be mixed); same-shaped images are
        processed together. A stacked uint8 array ``[N, H, W]`` or ``[N, H, W, 3]`` is taken as N images.
        """
        if isinstance(images, np.ndarray) and images.ndim < 3:
            raise TypeError("encode takes a sequence of images, not a single image; wrap it in a list")
        if len(images) == 0:
            raise ValueError("encode got no images; pass at least one")
        if isinstance(images, np.ndarray):
            _check_image(images[0], 0)  # one dtype and shape for the whole stack
            return self._encode_same_shape(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(_check_image(image, i).shape, []).append(i)
        if len(groups) == 1:  # the usual case: no scatter into a second buffer
            return self._encode_same_shape(np.stack(list(images)))
        out = np.empty((len(images), 3, self.image_size, self.image_size), dtype=np.float32)
        for indices in groups.values():
            out[indices] = self._encode_same_shape(np.stack([images[i] for i in indices]))
        return out

    def _encode_same_shape(self, batch: np.ndarray) -> np.ndarray:
        """[B, H, W] or [B, H, W, 3] uint8 -> [B, 3, S, S] float32, normalised."""
        x = batch.astype(np.float32) / np.float32(255.0)
        # RGB: NHWC -> NCHW. Grayscale: resize one channel, which the normalisation broadcasts to three.
        x = np.moveaxis(x, -1, 1) if x.ndim == 4 else x[:, None]
        resized = _resize(np.ascontiguousarray(x), self.image_size)
        # C order: ONNX Runtime takes the buffer as is, and numpy's "keep the input layout" could differ.
        return np.ascontiguousarray((resized - self._mean) / self._std)
