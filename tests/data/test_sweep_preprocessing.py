"""A table of bad and unusual inputs to preprocessing records, image files, folder splits and
export options. Bad rows: ``(id, call, exception type, regex naming the value)``; unusual but
valid rows: ``(id, call, expected tensor)`` with the expectation computed from the pixels."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.checks import ArgumentTypeError
from lightning_metric.data import ImageFolderDataModule, Preprocessing, PreprocessingError
from lightning_metric.data.preprocess import ImageDecodeError, load_images
from lightning_metric.export import export
from lightning_metric.heads import ArcFaceHead

pytestmark = pytest.mark.usefixtures("one_thread")

RGB8 = {"shape": [3, 8, 8], "preprocessing": Preprocessing("RGB", (8, 8)).to_dict()}


def _info(**changes: Any) -> dict[str, Any]:
    return {"shape": [3, 8, 8], "preprocessing": {**RGB8["preprocessing"], **changes}}


def _folder(root: Path, classes: int = 3) -> str:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (c, c, c)).save(root / f"c{c}" / "0.png")
    return str(root)


def _write(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    return path


def _save(root: Path, name: str, img: Image.Image) -> Path:
    img.save(root / name)
    return root / name


def _model() -> MetricLearningModule:
    return MetricLearningModule(
        backbone=SmallCNN(in_channels=1, width=4),
        embedding_dim=8,
        head=partial(ArcFaceHead),
        num_classes=3,
    ).eval()


def _png(root: Path) -> bytes:
    _save(root, "ok.png", Image.new("RGB", (4, 4)))
    return (root / "ok.png").read_bytes()


BAD: list[tuple[str, Callable[..., Any], type[Exception], str]] = [
    # records
    ("mode CMYK", lambda: Preprocessing("CMYK", (8, 8)), PreprocessingError,
     r"`mode` must be one of \('L', 'RGB'\), got 'CMYK'"),
    ("mode lower case", lambda: Preprocessing("rgb", (8, 8)), PreprocessingError,
     r"got 'rgb'"),
    ("size one number", lambda: Preprocessing("L", (8,)), PreprocessingError,
     r"size must be \[height, width\], got \(8,\)"),
    ("size string", lambda: Preprocessing("L", "8x8"), PreprocessingError,  # type: ignore[arg-type]
     r"size must be \[height, width\], got '8x8'"),
    ("size zero", lambda: Preprocessing("L", (0, 8)), PreprocessingError,
     r"`size\[0\] \(height\)` must be an integer >= 1, got 0"),
    ("size float", lambda: Preprocessing("L", (8, 8.0)), PreprocessingError,
     r"`size\[1\] \(width\)` must be an integer >= 1, got 8\.0 of type float"),
    ("resize below crop", lambda: Preprocessing("RGB", (16, 12), resize=10), PreprocessingError,
     r"`resize` must be an integer >= 16, got 10 \(size \[16, 12\]"),
    ("scale zero", lambda: Preprocessing("L", (8, 8), scale=0), PreprocessingError,
     r"scale must be a positive finite number, got 0"),
    ("scale nan", lambda: Preprocessing("L", (8, 8), scale=float("nan")), PreprocessingError,
     r"scale must be a positive finite number, got nan"),
    ("scale bool", lambda: Preprocessing("L", (8, 8), scale=True), PreprocessingError,
     r"scale must be a positive number, got True"),
    ("invert string", lambda: Preprocessing("L", (8, 8), invert="yes"), PreprocessingError,  # type: ignore[arg-type]
     r"invert must be true or false, got 'yes'"),
    ("mean without std", lambda: Preprocessing("L", (8, 8), mean=(0.5,)), PreprocessingError,
     r"mean and std go together: got mean=\(0\.5,\), std=None"),
    ("mean per channel", lambda: Preprocessing("RGB", (8, 8), mean=(0.5,), std=(0.2,)),
     PreprocessingError, r"mean must have one value per channel \(3\), got 1: \[0\.5\]"),
    ("std zero", lambda: Preprocessing("L", (8, 8), mean=(0.5,), std=(0.0,)), PreprocessingError,
     r"std must be > 0 for every channel, got \[0\.0\]"),
    ("mean nan", lambda: Preprocessing("L", (8, 8), mean=(float("nan"),), std=(1.0,)),
     PreprocessingError, r"mean must hold finite numbers, got \[nan\]"),
    ("record a list", lambda: Preprocessing.from_dict([1, 2]), PreprocessingError,
     r"must be a JSON object, got list: \[1, 2\]"),
    ("record of an older release", lambda: Preprocessing.from_dict(
        {"mode": "RGB", "size": [8, 8], "scale": 1 / 255}), PreprocessingError,
     r"record version None is not 1.*left out the normalisation.*rebuild the index"),
    ("record version 2", lambda: Preprocessing.from_dict({**RGB8["preprocessing"], "version": 2}),
     PreprocessingError, r"record version 2 is not 1"),
    ("record unknown field", lambda: Preprocessing.from_dict(
        {**RGB8["preprocessing"], "crop": 3}), PreprocessingError, r"unknown fields \['crop'\]"),
    ("record without size", lambda: Preprocessing.from_dict({"version": 1, "mode": "L"}),
     PreprocessingError, r"missing fields \['size'\]"),
    # input descriptions (manifest / sidecar) read by search --query
    ("no input description", lambda d: load_images([d / "x.png"], None), PreprocessingError,
     r"records no input description \(got None\)"),
    ("no record, with the reason", lambda d: load_images(
        [d / "x.png"], {"shape": [3, 8, 8], "preprocessing": None,
                        "preprocessing_unknown": "MyData overrides _eval_loader"}),
     PreprocessingError, r"cannot say how an image file.*MyData overrides _eval_loader"),
    ("shape disagrees with record", lambda d: load_images([d / "x.png"], {**_info(), "shape": [1, 8, 8]}),
     PreprocessingError, r"records input shape \[1, 8, 8\] but its preprocessing makes \[3, 8, 8\]"),
    ("bad mode in a manifest", lambda d: load_images([d / "x.png"], _info(mode="HSV")),
     PreprocessingError, r"`mode` must be one of \('L', 'RGB'\), got 'HSV'"),
    ("no paths", lambda: load_images([], RGB8), ValueError, r"no image paths given"),
    # image files
    ("text file", lambda d: load_images([_write(d, "notes.png", b"hello")], RGB8),
     ImageDecodeError, r"cannot decode image '.*notes\.png' \(UnidentifiedImageError"),
    ("truncated png", lambda d: load_images([_write(d, "cut.png", _png(d)[:40])], RGB8),
     ImageDecodeError, r"cannot decode image '.*cut\.png'"),
    ("missing file", lambda d: load_images([d / "gone.png"], RGB8), ImageDecodeError,
     r"cannot decode image '.*gone\.png' \(FileNotFoundError"),
    ("float pixels", lambda d: load_images(
        [_save(d, "f.tif", Image.fromarray(np.ones((4, 4), np.float32)))], RGB8),
     ImageDecodeError, r"f\.tif' \(floating-point pixels \(mode F\)"),
    ("32-bit negative pixels", lambda d: load_images(
        [_save(d, "i.tif", Image.fromarray(np.full((4, 4), -5, np.int32)))], RGB8),
     ImageDecodeError, r"i\.tif' \(32-bit integer pixels in \[-5, -5\]"),
    # folder splits
    ("val and test classes overlap", lambda d: ImageFolderDataModule(
        _folder(d, 4), val_classes=["c1"], test_classes=["c1", "c2"]), ValueError,
     r"val_classes and test_classes share \['c1'\]"),
    ("test_fraction above 1", lambda: ImageFolderDataModule("no/such/dir", test_fraction=1.5),
     ValueError, r"`test_fraction` must be a fraction in \(0, 1\), got 1\.5"),
    ("test_fraction negative", lambda: ImageFolderDataModule("no/such/dir", test_fraction=-0.1),
     ValueError, r"`test_fraction` must be a fraction in \(0, 1\), got -0\.1"),
    ("test_fraction bool", lambda: ImageFolderDataModule("no/such/dir", test_fraction=True),
     ArgumentTypeError, r"`test_fraction` must be a fraction in \(0, 1\), got True of type bool"),
    ("test_classes empty", lambda: ImageFolderDataModule("no/such/dir", test_classes=[]),
     ValueError, r"test_classes=\[\] names no class"),
    ("test_classes a string", lambda: ImageFolderDataModule("no/such/dir", test_classes="c1"),  # type: ignore[arg-type]
     ValueError, r"test_classes='c1' names no class"),
    ("test_classes unknown", lambda d: ImageFolderDataModule(_folder(d), test_classes=["nope"]),
     ValueError, r"test_classes \['nope'\] are not class folders \(found \['c0', 'c1', 'c2'\]"),
    ("fractions leave no train class", lambda d: ImageFolderDataModule(
        _folder(d, 3), val_fraction=0.5, test_fraction=0.5), ValueError,
     r"3 classes leave no training class after val 2 \(val_fraction=0\.5.*test 1"),
    ("two classes cannot make three splits", lambda d: ImageFolderDataModule(_folder(d, 2)),
     ValueError, r"2 classes leave no training class.*or set test_fraction=0"),
    ("named classes take them all", lambda d: ImageFolderDataModule(
        _folder(d, 3), val_classes=["c0"], test_classes=["c1", "c2"]), ValueError,
     r"3 classes leave no training class.*test_classes=\['c1', 'c2'\]"),
    ("resize_size below image_size", lambda: ImageFolderDataModule(
        "no/such/dir", image_size=224, resize_size=200), ValueError,
     r"resize_size 200 is smaller than image_size 224"),
    # export options
    ("export metric", lambda d: export(_model(), d / "m.pt", torch.rand(2, 1, 8, 8), metric="dot"),
     ValueError, r"`metric` must be one of \('cosine', 'ip', 'l2'\), got 'dot'"),
    ("export opset", lambda d: export(_model(), d / "m.onnx", torch.rand(2, 1, 8, 8), opset=3),
     ValueError, r"`opset` must be an integer >= 7, got 3"),
    ("export a bad record", lambda d: export(
        _model(), d / "m.pt", torch.rand(2, 1, 8, 8),
        input_info={"shape": [1, 8, 8], "preprocessing": {"version": 1, "mode": "L", "size": 8}}),
     PreprocessingError, r"size must be \[height, width\], got 8"),
    ("export a record of another shape", lambda d: export(
        _model(), d / "m.pt", torch.rand(2, 1, 8, 8), input_info=RGB8),
     PreprocessingError, r"makes \[3, 8, 8\] tensors but example_input is \[1, 8, 8\] per item"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "match"), [pytest.param(c, e, m, id=n) for n, c, e, m in BAD]
)
def test_bad_input(
    call: Callable[..., Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    _save(tmp_path, "x.png", Image.new("RGB", (8, 8)))
    with pytest.raises(error, match=match):
        call(tmp_path) if call.__code__.co_argcount else call()


# -- unusual but valid: the tensor is computed from the pixels ----------------------------------

GRAY = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
RGBA = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
WORDS = np.array([[0, 1000, 65535, 30000]] * 4, dtype=np.uint16)


def _palette(d: Path) -> Path:
    img = Image.fromarray(RGBA[..., :3]).quantize(16)
    img.info["transparency"] = 0
    img.save(d / "p.png", transparency=0)
    return d / "p.png"


def _palette_rgb(d: Path) -> torch.Tensor:
    img = Image.fromarray(RGBA[..., :3]).quantize(16)
    lookup = np.asarray(img.getpalette()[:48], dtype=np.float32).reshape(16, 3)
    return torch.from_numpy(lookup[np.asarray(img)] / 255).permute(2, 0, 1)


def _chw(pixels: np.ndarray, scale: float = 1 / 255) -> torch.Tensor:
    x = torch.from_numpy(pixels.astype(np.float32) * np.float32(scale))
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as PIL's L conversion (rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _load(mode: str, size: tuple[int, int], name: str, img: Any, **kw: Any) -> Callable:
    def call(d: Path) -> torch.Tensor:
        path = img(d) if callable(img) else _save(d, name, img)
        return Preprocessing(mode, size, **kw).load(path)

    return call


VALID: list[tuple[str, Callable[[Path], torch.Tensor], Callable[[Path], torch.Tensor]]] = [
    ("grayscale file, RGB model: three equal channels",
     _load("RGB", (8, 8), "g.png", Image.fromarray(GRAY)),
     lambda d: _chw(np.repeat(GRAY[..., None], 3, axis=2))),
    ("RGBA file: alpha dropped, colour kept",
     _load("RGB", (8, 8), "a.png", Image.fromarray(RGBA, "RGBA")),
     lambda d: _chw(RGBA[..., :3])),
    ("RGBA file, L model: luma of the colour",
     _load("L", (8, 8), "a.png", Image.fromarray(RGBA, "RGBA")),
     lambda d: _chw(_luma(RGBA[..., :3]))),
    ("palette file with transparency: the palette colours", _load("RGB", (8, 8), "", _palette),
     _palette_rgb),
    ("16-bit grayscale: scaled to 8 bits, not clipped",
     _load("L", (4, 4), "w.png", Image.fromarray(WORDS)),
     lambda d: _chw(np.rint(WORDS.astype(np.float64) * 255 / 65535).astype(np.uint8))),
    ("1-bit file: 0 and 1",
     _load("L", (8, 8), "b.png", Image.fromarray(GRAY > 100)),
     lambda d: _chw((GRAY > 100).astype(np.uint8), 1.0)),
    ("1x1 image, resize and crop: a constant image",
     _load("RGB", (8, 8), "t.png", Image.new("RGB", (1, 1), (10, 20, 30)), resize=9),
     lambda d: _chw(np.broadcast_to(np.array([10, 20, 30], np.uint8), (8, 8, 3)))),
    ("tall 3x40 image: shorter side up, centre crop", _load(
        "L", (6, 6), "tall.png", Image.new("L", (3, 40), 77), resize=6),
     lambda d: _chw(np.full((6, 6), 77, np.uint8))),
    ("image already at size: its pixels, scaled",
     _load("L", (8, 8), "s.png", Image.fromarray(GRAY), scale=1 / 16),
     lambda d: _chw(GRAY, 1 / 16)),
    ("normalised with mean/std",
     _load("L", (8, 8), "n.png", Image.fromarray(GRAY), mean=(0.5,), std=(0.25,)),
     lambda d: (_chw(GRAY) - 0.5) / 0.25),
]  # fmt: skip


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=n) for n, c, e in VALID])
def test_unusual_input(
    call: Callable[[Path], torch.Tensor],
    expected: Callable[[Path], torch.Tensor],
    tmp_path: Path,
) -> None:
    got, want = call(tmp_path), expected(tmp_path)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-6


def test_the_table_is_large_and_its_ids_unique() -> None:
    ids = [row[0] for row in BAD] + [row[0] for row in VALID]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
