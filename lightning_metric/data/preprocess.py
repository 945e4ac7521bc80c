"""How an image file becomes a model input: one record, one function, used everywhere.

A :class:`Preprocessing` is a small JSON-serialisable description (colour mode, size, optional
shorter-side resize + centre crop, pixel scale, inversion, mean/std) that is also the
transform itself: the image data modules' evaluation datasets call it on every image, the
index manifest and the export sidecar store ``to_dict()``, and ``lightning-metric search
--query`` rebuilds it with ``from_dict``. The loader, the index and the exported model
therefore cannot disagree about how a file is read.

Conversions, in order: decode; 16-bit grayscale to 8 bits (``round(v * 255 / 65535)``);
to ``mode`` (``L`` or ``RGB``; an alpha channel is dropped, not composited, as torchvision's
``ImageFolder`` loader does); resize (a plain resize to ``size``, or the shorter side to
``resize`` then a centre crop to ``size``, as torchvision's ``Resize(resize)`` +
``CenterCrop(size)``; bilinear); to float32 ``[C, H, W]``; ``255 - v`` if ``invert``;
``v * scale``; ``(v - mean) / std`` if recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lightning_metric.checks import check_choice, check_int

__all__ = [
    "MODES",
    "RECORD_VERSION",
    "ImageDecodeError",
    "Preprocessing",
    "PreprocessingError",
    "open_image",
]

#: Bumped when the meaning of a record changes; records without it (or with another value)
#: are refused rather than read with the wrong meaning.
RECORD_VERSION = 1
MODES = ("L", "RGB")
_CHANNELS = {"L": 1, "RGB": 3}
_FIELDS = ("version", "mode", "size", "resize", "scale", "invert", "mean", "std")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageDecodeError(OSError):
    """An image file exists but cannot be decoded (or has a pixel format no model reads)."""


class PreprocessingError(ValueError):
    """A preprocessing record is malformed, or a data module's preprocessing cannot be
    described by one."""


def _decode_error(path: Union[str, Path], why: str) -> ImageDecodeError:
    return ImageDecodeError(
        f"cannot decode image {str(path)!r} ({why}); replace or remove the file (bad images "
        "are not skipped: that would change the splits)"
    )


def open_image(path: Union[str, Path]) -> Any:
    """Decode ``path`` fully into a PIL image in its own mode, or raise
    :class:`ImageDecodeError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _decode_error(path, f"{type(err).__name__}: {err}") from err


def _to_mode(img: Any, mode: str, source: str) -> Any:
    """``img`` in PIL mode ``mode`` (``L`` / ``RGB``), without clipping 16-bit values."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise _decode_error(
                source,
                f"32-bit integer pixels in [{values.min()}, {values.max()}]; expected 8-bit "
                "or 16-bit values",
            )
        # Rounded, so 0 and 65535 map to 0 and 255 exactly; PIL's own convert clips at 255.
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif img.mode == "F":
        raise _decode_error(source, "floating-point pixels (mode F); save it as 8 or 16 bits")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return img if img.mode == mode else img.convert(mode)


def _real_list(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PreprocessingError(f"{name} must be a list of {length} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PreprocessingError(f"{name} must hold finite numbers, got {list(value)!r}")
        out.append(float(v))
    if len(out) != length:
        raise PreprocessingError(
            f"{name} must have one value per channel ({length}), got {len(out)}: {list(value)!r}"
        )
    return tuple(out)


@dataclass(frozen=True)
class Preprocessing:
    """PIL image -> float32 tensor ``[C, H, W]``, described by JSON-serialisable fields.

    Args:
        mode: ``"L"`` (1 channel) or ``"RGB"`` (3 channels).
        size: ``(H, W)`` of the model input.
        resize: resize the shorter side to this many pixels and centre-crop ``size``; ``None``
            resizes the whole image to ``size`` (aspect ratio not kept).
        scale: pixel values (0-255 after the conversion) are multiplied by this.
        invert: use ``255 - v`` (dark ink on a light page, for a model trained on bright ink).
        mean: per-channel mean subtracted after scaling (with ``std``), or ``None``.
        std: per-channel standard deviation divided by, or ``None``.
    """

    mode: str
    size: tuple[int, int]
    resize: Optional[int] = None
    scale: float = 1.0 / 255.0
    invert: bool = False
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        try:
            check_choice("mode", self.mode, MODES)
        except (TypeError, ValueError) as err:
            raise PreprocessingError(str(err)) from None
        size = self.size
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
            raise PreprocessingError(f"size must be [height, width], got {size!r}")
        try:
            height = check_int("size[0] (height)", size[0], minimum=1)
            width = check_int("size[1] (width)", size[1], minimum=1)
            if self.resize is not None:
                check_int("resize", self.resize, minimum=max(height, width))
        except (TypeError, ValueError) as err:
            raise PreprocessingError(
                f"{err} (size {list(size)!r}; resize must cover the crop, else the crop would "
                "be padded with black)"
                if "resize" in str(err)
                else str(err)
            ) from None
        object.__setattr__(self, "size", (height, width))
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise PreprocessingError(f"scale must be a positive number, got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise PreprocessingError(f"scale must be a positive finite number, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))
        if not isinstance(self.invert, bool):
            raise PreprocessingError(f"invert must be true or false, got {self.invert!r}")
        if (self.mean is None) != (self.std is None):
            raise PreprocessingError(
                f"mean and std go together: got mean={self.mean!r}, std={self.std!r}"
            )
        if self.mean is not None and self.std is not None:
            mean = _real_list("mean", self.mean, self.channels)
            std = _real_list("std", self.std, self.channels)
            if min(std) <= 0:
                raise PreprocessingError(f"std must be > 0 for every channel, got {list(std)}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        return _CHANNELS[self.mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the tensor this produces."""
        return (self.channels, *self.size)

    # -- the record -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "mode": self.mode,
            "size": list(self.size),
            "resize": self.resize,
            "scale": self.scale,
            "invert": self.invert,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
        }

    @classmethod
    def from_dict(cls, record: Any) -> Preprocessing:
        """The preprocessing a record (``to_dict()``, e.g. from a manifest) describes."""
        if not isinstance(record, Mapping):
            raise PreprocessingError(
                f"a preprocessing record must be a JSON object, got {type(record).__name__}: "
                f"{record!r}"
            )
        version = record.get("version")
        if version != RECORD_VERSION:
            raise PreprocessingError(
                f"preprocessing record version {version!r} is not {RECORD_VERSION}: it was "
                "written by another release (records before version 1 left out the "
                "normalisation and centre crop of image-file data); rebuild the index with "
                "`lightning-metric predict` or re-export the model"
            )
        unknown = sorted(set(record) - set(_FIELDS))
        missing = [f for f in ("mode", "size") if f not in record]
        if unknown or missing:
            raise PreprocessingError(
                f"preprocessing record {dict(record)!r}: "
                + (f"unknown fields {unknown}" if unknown else f"missing fields {missing}")
                + f"; expected the fields {list(_FIELDS)}"
            )
        return cls(
            mode=record["mode"],
            size=record["size"],
            resize=record.get("resize"),
            scale=record.get("scale", 1.0 / 255.0),
            invert=record.get("invert", False),
            mean=record.get("mean"),
            std=record.get("std"),
        )

    # -- the transform --------------------------------------------------------------------
    def __call__(self, img: Any, source: str = "<image>") -> torch.Tensor:
        """The model input for a PIL image (``source`` names it in errors)."""
        from PIL import Image

        img = _to_mode(img, self.mode, source)
        height, width = self.size
        if self.resize is None:
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        else:
            # torchvision's Resize(int): the shorter side to `resize`, the longer one truncated.
            w, h = img.size
            if w <= h:
                new = (self.resize, int(self.resize * h / w))
            else:
                new = (int(self.resize * w / h), self.resize)
            if new != img.size:
                img = img.resize(new, Image.Resampling.BILINEAR)
            # torchvision's CenterCrop: offsets rounded half to even, as Python's round.
            left = int(round((new[0] - width) / 2.0))
            top = int(round((new[1] - height) / 2.0))
            img = img.crop((left, top, left + width, top + height))
        x = np.asarray(img, dtype=np.float32)
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        if self.invert:
            x = 255.0 - x
        x = x * np.float32(self.scale)
        if self.mean is not None and self.std is not None:
            mean = np.asarray(self.mean, np.float32)[:, None, None]
            std = np.asarray(self.std, np.float32)[:, None, None]
            x = (x - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def load(self, path: Union[str, Path]) -> torch.Tensor:
        """The model input for the image file ``path``."""
        return self(open_image(path), str(path))

    def load_many(self, paths: Sequence[Union[str, Path]]) -> torch.Tensor:
        """``[N, C, H, W]``: :meth:`load` of each path."""
        if not paths:
            raise ValueError("no image paths given; expected at least one image file")
        return torch.stack([self.load(p) for p in paths])


def single_record(name: str, records: Iterable[tuple[str, Preprocessing]]) -> Preprocessing:
    """The one record that describes every evaluation split of data module ``name``, given
    ``(split, record)`` pairs; a :class:`PreprocessingError` when they differ or none is given."""
    found: Optional[tuple[str, Preprocessing]] = None
    for split, pre in records:
        if found is not None and pre != found[1]:
            raise PreprocessingError(
                f"{name}'s evaluation splits are read differently ({found[1]} in {found[0]} vs "
                f"{pre} in {split}); one record cannot describe them"
            )
        found = (split, pre)
    if found is None:
        raise PreprocessingError(f"{name} has no evaluation split to describe")
    return found[1]


def record_of_input(input_info: Any, where: str = "the index") -> Preprocessing:
    """The :class:`Preprocessing` an input description (``describe_input``: a manifest's
    ``info["input"]`` or a sidecar's ``input``) records, checked against its ``shape``."""
    if not isinstance(input_info, Mapping):
        raise PreprocessingError(
            f"{where} records no input description (got {input_info!r}); rebuild it with "
            "`lightning-metric predict` (or re-export the model)"
        )
    record = input_info.get("preprocessing")
    if record is None:
        reason = input_info.get("preprocessing_unknown") or "no preprocessing was recorded"
        raise PreprocessingError(
            f"{where} cannot say how an image file becomes the model input: {reason}. Embed "
            "the queries with the data module's own loader (--config/--ckpt_path) instead"
        )
    pre = Preprocessing.from_dict(record)
    shape = input_info.get("shape")
    if shape is not None and list(shape) != list(pre.shape):
        raise PreprocessingError(
            f"{where} records input shape {list(shape)!r} but its preprocessing makes "
            f"{list(pre.shape)!r} tensors; the record is inconsistent, rebuild it"
        )
    return pre


def load_images(paths: Sequence[Union[str, Path]], input_info: Any) -> torch.Tensor:
    """``[N, C, H, W]`` float32: the image files as the recorded preprocessing reads them."""
    return record_of_input(input_info).load_many(paths)
