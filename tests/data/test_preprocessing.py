"""One preprocessing record: what the index manifest / export sidecar record reads an image file
into exactly the tensor the data module's evaluation loader gives the model, for every data
module; and val/test splits that are not the same items without a warning."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets_layouts import _write_inshop, _write_sop

from lightning_metric import MetricLearningModule, SmallCNN
from lightning_metric.callbacks import EmbeddingIndexWriter
from lightning_metric.data import (
    ArrayDataModule,
    ArrayDataset,
    Cars196DataModule,
    CUB200DataModule,
    DigitsDataModule,
    GlyphsDataModule,
    ImageFolderDataModule,
    InShopDataModule,
    Preprocessing,
    SOPDataModule,
)
from lightning_metric.data.folders import IMAGENET_MEAN, IMAGENET_STD
from lightning_metric.data.preprocess import PreprocessingError, load_images
from lightning_metric.export import describe_input, export, sidecar_path
from lightning_metric.heads import ArcFaceHead
from lightning_metric.retrieval.index import EmbeddingIndex

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"num_workers": 0, "batch_size": 4, "augment": False}
# Shorter side to 20, then a 16 x 16 centre crop: the standard evaluation transform, small.
CROP = {"image_size": 16, "resize_size": 20, "transforms": "standard", **SMALL}


def _rng_image(seed: int, height: int, width: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _eval_tensors(dm: Any, split: str) -> torch.Tensor:
    loader = getattr(dm, f"{split}_dataloader")()
    loaders = loader if isinstance(loader, list) else [loader]
    return torch.cat([b["x"] for ldr in loaders for b in ldr])


def _record(dm: Any, x: torch.Tensor) -> dict[str, Any]:
    """The input description as an index manifest stores it (through JSON)."""
    return json.loads(json.dumps(describe_input(dm, x[:1])))


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-6


# -- image files on disk: every file layout ----------------------------------------------------


def _folder(root: Path, classes: int = 6, per_class: int = 2) -> Path:
    """Images of varied sizes, aspect ratios and PIL modes, so resize and crop matter."""
    modes = ["RGB", "L", "RGBA", "P"]
    for c in range(classes):
        for i in range(per_class):
            n = c * per_class + i
            img = _rng_image(n, 18 + 7 * (n % 4), 40 - 5 * (n % 3))
            mode = modes[n % len(modes)]
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            img.convert(mode).save(root / f"c{c}" / f"{i}.png")
    return root


def _image_paths(dm: Any, split: str) -> list[str]:
    if split == "test" and isinstance(dm, InShopDataModule):
        return dm.dataset("query").paths + dm.dataset("gallery").paths
    return dm.dataset(split).paths


def _cub(root: Path) -> Path:
    lines, labels = [], []
    for n, c in enumerate([k for k in range(1, 201) for _ in range(1 + k % 2)], start=1):
        rel = f"{c:03d}.S/img_{n}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        _rng_image(n, 20 + n % 9, 25 + n % 5).save(root / "images" / rel, quality=90)
        lines.append(f"{n} {rel}")
        labels.append(f"{n} {c}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def _cars(root: Path) -> Path:
    from scipy.io import savemat

    n = 196 * 2
    annotations = np.zeros((1, n), dtype=[("relative_im_path", "O"), ("class", "O")])
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _rng_image(i, 21, 30).save(root / rel)
        annotations[0, i] = (rel, np.array([[i % 196 + 1]], dtype=np.uint8))
    savemat(root / "cars_annos.mat", {"annotations": annotations})
    return root


def _rewrite_images(root: Path, suffixes: tuple[str, ...]) -> None:
    """Replace the layout helpers' one repeated PNG with distinct images of varied sizes."""
    for n, path in enumerate(sorted(p for p in root.rglob("*") if p.suffix in suffixes)):
        _rng_image(n, 17 + n % 6, 30 - n % 7).save(path, format="PNG")


def _sop(root: Path) -> Path:
    _write_sop(root)
    _rewrite_images(root, (".JPG",))
    return root


def _inshop(root: Path) -> Path:
    _write_inshop(root, [["train", "train"]] * 3 + [["query", "gallery", "gallery"]] * 3)
    _rewrite_images(root, (".jpg",))
    return root


FILE_MODULES = {
    "folder": lambda root, **kw: ImageFolderDataModule(str(_folder(root)), **kw),
    "cub": lambda root, **kw: CUB200DataModule(str(_cub(root)), **kw),
    "cars": lambda root, **kw: Cars196DataModule(str(_cars(root)), **kw),
    "sop": lambda root, **kw: SOPDataModule(str(_sop(root)), **kw),
    "inshop": lambda root, **kw: InShopDataModule(str(_inshop(root)), **kw),
}


@pytest.mark.filterwarnings("ignore:.*val and test serve the same")
@pytest.mark.parametrize("transforms", ["standard", "resize"])
@pytest.mark.parametrize("name", sorted(FILE_MODULES))
def test_image_file_record_reads_files_as_the_eval_loader(
    name: str, transforms: str, tmp_path: Path
) -> None:
    dm = FILE_MODULES[name](tmp_path, **{**CROP, "transforms": transforms})
    x = _eval_tensors(dm, "test")
    info = _record(dm, x)
    pre = info["preprocessing"]
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["std"] == pytest.approx(IMAGENET_STD)
    assert pre["resize"] == (20 if transforms == "standard" else None)
    _same(load_images(_image_paths(dm, "test"), info), x)


def test_centre_crop_takes_the_middle_pixels_of_an_image_already_at_size(tmp_path: Path) -> None:
    """Ground truth without resampling: a 40 x 20 image whose shorter side is already
    ``resize`` is only cropped, at columns 12-27 and rows 2-17 (torchvision's offsets)."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    pre = Preprocessing("RGB", (16, 16), resize=20, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    got = pre(Image.fromarray(pixels))
    crop = torch.from_numpy(pixels[2:18, 12:28].astype(np.float32) / 255).permute(2, 0, 1)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    _same(got, (crop - mean) / std)
    # Shorter side 10 -> 20: the longer one 47 * 2 = 94, crop offset round(78 / 2) = 39.
    wide = _rng_image(1, 10, 47)
    assert pre(wide).shape == (3, 16, 16)
    resized = np.asarray(wide.resize((94, 20), Image.Resampling.BILINEAR), dtype=np.float32)
    crop = torch.from_numpy(resized[2:18, 39:55] / 255).permute(2, 0, 1)
    _same(pre(wide), (crop - mean) / std)


# -- items held in memory: a PNG written from an item reads back as the item ------------------


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glyphs")


class RGBArrays(ArrayDataModule):
    """A user's in-memory data module: uint8 RGB arrays, scaled by 1/255."""

    image_size = 6
    in_channels = 3

    def build_datasets(self) -> dict[str, ArrayDataset]:
        rng = np.random.default_rng(0)
        return {
            s: ArrayDataset(rng.integers(0, 256, (8, 3, 6, 5), dtype=np.uint8), np.arange(8) % 4)
            for s in ("train", "val", "test")
        }


def _array_modules(glyph_cache: Path) -> dict[str, Any]:
    return {
        "glyphs": GlyphsDataModule(
            cache_dir=str(glyph_cache), image_size=8, max_classes=12, **SMALL
        ),
        "digits": DigitsDataModule(**SMALL),
        "array": RGBArrays(**SMALL),
    }


@pytest.mark.parametrize("name", ["glyphs", "digits", "array"])
def test_png_of_an_item_reads_back_as_the_loader_tensor(
    name: str, glyph_cache: Path, tmp_path: Path
) -> None:
    dm = _array_modules(glyph_cache)[name]
    x = _eval_tensors(dm, "test")
    stored = dm.dataset("test").images
    paths = []
    for i in range(min(len(stored), 12)):
        # The item's stored pixels, as they would sit in an image file of that kind.
        pixels = stored[i].numpy().astype(np.uint8)
        img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    info = _record(dm, x)
    expected_scale = {"glyphs": 1 / 255, "digits": 1 / 16, "array": 1 / 255}[name]
    assert info["preprocessing"]["scale"] == expected_scale
    assert info["preprocessing"]["mean"] is None and info["preprocessing"]["invert"] is False
    _same(load_images(paths, info), x[: len(paths)])


def test_inverted_record_reads_dark_ink_as_bright(tmp_path: Path) -> None:
    ink = np.zeros((8, 8), dtype=np.uint8)
    ink[2:6, 3] = 255
    Image.fromarray(255 - ink).save(tmp_path / "page.png")  # dark ink on a light page
    pre = Preprocessing("L", (8, 8), invert=True)
    _same(pre.load(tmp_path / "page.png")[0], torch.from_numpy(ink / 255.0).float())


# -- the issue: searching an image-folder index with its own files -----------------------------


def _model(in_channels: int = 3) -> MetricLearningModule:
    torch.manual_seed(0)
    return MetricLearningModule(
        backbone=SmallCNN(in_channels=in_channels, width=8),
        embedding_dim=16,
        head=partial(ArcFaceHead),
        num_classes=4,
    ).eval()


def test_indexed_files_find_themselves_through_the_record(tmp_path: Path) -> None:
    """Issue 18: files of an image-folder index, read through the manifest's record, each find
    their own entry first with cosine 1 (the old record found 1 of 40)."""
    dm = ImageFolderDataModule(
        str(_folder(tmp_path / "data", classes=8, per_class=5)),
        val_fraction=0.25,
        test_fraction=0.5,
        predict_split="test",
        **CROP,
    )
    model = _model()
    out = tmp_path / "index"
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EmbeddingIndexWriter(str(out), allow_untrained=True)],
    )
    trainer.predict(model, datamodule=dm, return_predictions=False)
    index = EmbeddingIndex.load(out)
    assert index.paths is not None and len(index) == 20
    x = load_images(index.paths, index.info["input"])
    with torch.no_grad():
        result = index.search(model(x), k=1)
    np.testing.assert_array_equal(result.ids[:, 0], index.ids)
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-4)


def test_exported_onnx_on_record_read_files_equals_the_module(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    dm = FILE_MODULES["folder"](tmp_path / "data", **CROP)
    model = _model()
    example = _eval_tensors(dm, "test")[:2]
    path = export(model, tmp_path / "model.onnx", example, datamodule=dm)
    side = json.loads(sidecar_path(path).read_text())
    paths = dm.dataset("test").paths
    x = load_images(paths, side["input"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(_eval_tensors(dm, "test")).numpy()
    assert np.abs(got - expected).max() <= 1e-4


# -- data modules no record describes say so ---------------------------------------------------


class CustomEval(ImageFolderDataModule):
    """A user's evaluation transform that no record describes."""

    def transform(self, split: str) -> Any:
        base = super().transform(split)
        return lambda img: base(img) * 2.0


def test_custom_eval_transform_is_refused_by_search_and_export(tmp_path: Path) -> None:
    dm = CustomEval(str(_folder(tmp_path / "data")), **CROP)
    x = _eval_tensors(dm, "test")
    info = _record(dm, x)
    assert info["preprocessing"] is None
    assert "the val split of CustomEval is read with <function" in info["preprocessing_unknown"]
    with pytest.raises(PreprocessingError, match=r"cannot say how an image file.*CustomEval"):
        load_images(dm.dataset("test").paths, info)
    with pytest.warns(UserWarning, match=r"records no preprocessing.*CustomEval"):
        export(_model(), tmp_path / "m.pt", x[:2], datamodule=dm)


def test_record_of_another_shape_than_the_model_input_is_not_written(tmp_path: Path) -> None:
    dm = FILE_MODULES["folder"](tmp_path, **CROP)
    info = describe_input(dm, torch.zeros(1, 3, 8, 8))
    assert info["preprocessing"] is None
    assert (
        "makes [3, 16, 16] tensors but the model input is [3, 8, 8]"
        in (info["preprocessing_unknown"])
    )


# -- honest splits -----------------------------------------------------------------------------


def _setup_warnings(dm: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
        dm.setup()  # once: the datasets are built once
    return [str(w.message) for w in caught if "val and test" in str(w.message)]


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("cub", "CUB200DataModule: val and test serve the same 150 items (the CUB-200-2011 "),
        ("cars", "Cars196DataModule: val and test serve the same 196 items (the Cars196 "),
        ("sop", "SOPDataModule: val and test serve the same 7 items (the Stanford Online "),
        ("inshop", "InShopDataModule: val and test serve the same [query, gallery] = [3, 6] "),
    ],
)
def test_benchmarks_without_a_val_split_say_so_once(name: str, says: str, tmp_path: Path) -> None:
    dm = FILE_MODULES[name](tmp_path, **CROP)
    (message,) = _setup_warnings(dm)
    assert message.startswith(says) and "chosen on the test set" in message


def test_image_folder_val_and_test_are_class_disjoint_by_default(tmp_path: Path) -> None:
    root = _folder(tmp_path, classes=8)
    dm = ImageFolderDataModule(str(root), **CROP)
    assert _setup_warnings(dm) == []
    val, test = dm.dataset("val"), dm.dataset("test")
    assert len(val.classes) == len(test.classes) == 2  # round(0.25 * 8)
    assert set(val.classes).isdisjoint(test.classes)
    assert set(val.paths).isdisjoint(test.paths)
    for seed in range(5):  # deterministic from the seed, and the seed matters
        a = ImageFolderDataModule(str(root), seed=seed, **CROP).splits
        b = ImageFolderDataModule(str(root), seed=seed, **CROP).splits
        assert a["test"][2] == b["test"][2] and a["val"][2] == b["val"][2]
    drawn = {
        tuple(ImageFolderDataModule(str(root), seed=s, **CROP).splits["test"][2]) for s in range(5)
    }
    assert len(drawn) > 1
    shared = ImageFolderDataModule(str(root), test_fraction=0, **CROP)
    (message,) = _setup_warnings(shared)
    assert message.startswith("ImageFolderDataModule: val and test serve the same 4 items")


@pytest.mark.parametrize("name", ["glyphs", "digits"])
def test_built_in_arrays_serve_different_val_and_test_items(name: str, glyph_cache: Path) -> None:
    dm = _array_modules(glyph_cache)[name]
    assert _setup_warnings(dm) == []
    assert dm.shared_eval_splits() is None
