"""ImageFolderDataModule and the CUB / Cars196 / SOP / In-Shop layouts on tiny generated fixtures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from repo_paths import CONFIGS

from lightning_metric.data import (
    Cars196DataModule,
    CUB200DataModule,
    ImageFolderDataModule,
    InShopDataModule,
    SOPDataModule,
)
from lightning_metric.data.folders import ImageDecodeError, standard_transform

FAST = {"num_workers": 0, "transforms": "resize", "image_size": 16, "batch_size": 4}


def _png_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


def _write(path: Path, data: bytes = PNG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# -- image folders -----------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for c in range(6):
        for i in range(c % 3 + 2):  # 2, 3, 4, 2, 3, 4 images
            _write(tmp_path / f"class_{c}" / f"img{i}.PNG")
    (tmp_path / "class_0" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("a file beside the class folders")
    return tmp_path


def test_image_folder_class_disjoint_split(folder: Path) -> None:
    dm = ImageFolderDataModule(str(folder), val_fraction=1 / 3, test_fraction=1 / 3, seed=1, **FAST)
    assert dm.num_classes == 2  # known right after __init__
    train, val, test = (dm.splits[s] for s in ("train", "val", "test"))
    # three class-disjoint splits of two classes each, covering every image once
    assert len(train[2]) == len(val[2]) == len(test[2]) == 2
    assert set(train[2]).isdisjoint(val[2]) and set(val[2]).isdisjoint(test[2])
    assert set(train[2]).isdisjoint(test[2])
    assert sorted(train[0] + val[0] + test[0]) == sorted(str(p) for p in folder.rglob("*.PNG"))
    again = ImageFolderDataModule(
        str(folder), val_fraction=1 / 3, test_fraction=1 / 3, seed=1, **FAST
    )
    assert again.splits["val"][2] == val[2] and again.splits["test"][2] == test[2]  # seeded
    explicit = ImageFolderDataModule(str(folder), val_classes=["class_1", "class_4"], **FAST)
    assert explicit.splits["val"][2] == ["class_1", "class_4"]
    # test: round(0.25 * 6) = 2 of the four others, drawn by seed; train: the last two
    assert len(explicit.splits["test"][2]) == 2 and explicit.num_classes == 2
    assert not {"class_1", "class_4"} & set(explicit.splits["test"][2])
    assert len(explicit.splits["val"][0]) == 6
    batch = next(iter(explicit.val_dataloader()))
    assert set(batch) == {"x", "label", "index"}
    assert batch["x"].shape == (4, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["label"].tolist() == [0, 0, 0, 1] and batch["index"].tolist() == [0, 1, 2, 3]


def test_image_folder_m_per_class_batches(folder: Path) -> None:
    dm = ImageFolderDataModule(
        str(folder), val_classes=["class_5"], test_classes=["class_0"], m_per_class=2, **FAST
    )
    labels = dm.dataset("train").labels
    for batch in dm.train_dataloader():
        counts = torch.bincount(labels[batch["index"]])
        assert sorted(counts[counts > 0].tolist()) == [2, 2]
        assert torch.equal(batch["label"], labels[batch["index"]])


def test_image_folder_bad_input(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root '.*missing' does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing"), **FAST)
    flat = tmp_path / "flat"
    _write(flat / "a.png")
    with pytest.raises(FileNotFoundError, match="one sub-directory per class"):
        ImageFolderDataModule(str(flat), **FAST)
    with pytest.raises(ValueError, match=r"val_classes \['nope'\] are not class folders"):
        ImageFolderDataModule(str(folder), val_classes=["nope"], **FAST)


def test_undecodable_image_is_an_error_naming_the_file(folder: Path) -> None:
    bad = folder / "class_2" / "img9.png"
    bad.write_bytes(b"\x89PNG truncated")
    dm = ImageFolderDataModule(
        str(folder), val_classes=["class_2", "class_3"], test_fraction=0, **FAST
    )
    val = dm.dataset("val")
    with pytest.raises(ImageDecodeError, match=r"img9\.png"):
        val[val.paths.index(str(bad))]
    checked = ImageFolderDataModule(
        str(folder), val_classes=["class_2", "class_3"], verify_images=True, test_fraction=0, **FAST
    )
    with pytest.raises(ImageDecodeError, match=r"1 of \d+ images cannot be decoded:\n .*img9\.png"):
        checked.setup()


# -- benchmark layouts -------------------------------------------------------------------------


def test_cub_layout(tmp_path: Path) -> None:
    lines, labels = [], []
    class_of_image = [c for c in range(1, 201) for _ in range(1 + (c % 2))]
    for n, c in enumerate(class_of_image, start=1):
        rel = f"{c:03d}.Species_{c}/img_{n}.jpg"
        _write(tmp_path / "images" / rel)
        lines.append(f"{n} {rel}")
        labels.append(f"{n} {c}")
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    dm = CUB200DataModule(str(tmp_path), **FAST)
    assert dm.num_classes == 100
    train, test = dm.splits["train"], dm.splits["test"]
    assert train[2] == list(range(1, 101)) and test[2] == list(range(101, 201))
    assert len(train[0]) == 150 and len(test[0]) == 150  # odd classes have 2 images
    assert dm.splits["val"] is test
    item = dm.dataset("test")[0]
    assert item["label"] == 0 and dm.dataset("test").classes[0] == 101
    (tmp_path / "images" / lines[0].split()[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 150 images listed in the train split"):
        CUB200DataModule(str(tmp_path), **FAST).setup()
    (tmp_path / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"image_class_labels\.txt"):
        CUB200DataModule(str(tmp_path), **FAST)


def test_cars196_layout(tmp_path: Path) -> None:
    from scipy.io import savemat

    n = 196 * 2
    annotations = np.zeros((1, n), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _write(tmp_path / rel)
        annotations[0, i] = (rel, np.array([[i % 196 + 1]], dtype=np.uint8), np.array([[i % 2]]))
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    dm = Cars196DataModule(str(tmp_path), **FAST)
    assert dm.num_classes == 98
    assert dm.splits["test"][2] == list(range(99, 197))
    assert len(dm.splits["train"][0]) == 196 and len(dm.splits["test"][0]) == 196
    batch = next(iter(dm.test_dataloader()))
    assert batch["x"].shape == (4, 3, 16, 16)
    savemat(tmp_path / "cars_annos.mat", {"something_else": np.zeros(3)})
    with pytest.raises(ValueError, match=r"cars_annos\.mat.*'annotations'"):
        Cars196DataModule(str(tmp_path), **FAST)


def _write_sop(root: Path) -> None:
    header = "image_id class_id super_class_id path\n"
    rows = {"train": [], "test": []}
    image_id = 0
    for cls in range(1, 9):  # classes 1-5 train, 6-8 test, 2-3 images each
        split = "train" if cls <= 5 else "test"
        for j in range(2 + cls % 2):
            image_id += 1
            rel = f"bicycle_final/{cls}_{j}.JPG"
            _write(root / rel)
            rows[split].append(f"{image_id} {cls} 1 {rel}")
    for split in rows:
        (root / f"Ebay_{split}.txt").write_text(header + "\n".join(rows[split]) + "\n")


def test_sop_layout(tmp_path: Path) -> None:
    _write_sop(tmp_path)
    dm = SOPDataModule(str(tmp_path), **FAST)
    assert dm.num_classes == 5
    assert dm.splits["train"][2] == [1, 2, 3, 4, 5] and dm.splits["test"][2] == [6, 7, 8]
    assert len(dm.splits["train"][0]) == 13 and len(dm.splits["test"][0]) == 7
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x 1 a.jpg\n")
    with pytest.raises(ValueError, match=r"Ebay_test\.txt.*class_id must be an integer, got 'x'"):
        SOPDataModule(str(tmp_path), **FAST)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Ebay_test\.txt"):
        SOPDataModule(str(tmp_path), **FAST)


def _write_inshop(root: Path, statuses_of_items: list[list[str]]) -> None:
    """An In-Shop layout: item ``i + 1`` has one image per entry of ``statuses_of_items[i]``."""
    lines = []
    for item, statuses in enumerate(statuses_of_items, start=1):
        name = f"id_{item:08d}"
        for j, status in enumerate(statuses):
            rel = f"img/WOMEN/Dresses/{name}/{j:02d}_front.jpg"
            _write(root / rel)
            lines.append(f"{rel} {name} {status}")
    text = f"{len(lines)}\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    (root / "list_eval_partition.txt").write_text(text)


def test_inshop_layout_query_gallery(tmp_path: Path) -> None:
    _write_inshop(tmp_path, [["train", "train"]] * 3 + [["query", "gallery", "gallery"]] * 3)
    dm = InShopDataModule(str(tmp_path), **FAST)
    assert dm.num_classes == 3
    query, gallery = dm.splits["query"], dm.splits["gallery"]
    assert len(dm.splits["train"][0]) == 6 and len(query[0]) == 3 and len(gallery[0]) == 6
    assert query[2] == gallery[2] == ["id_00000004", "id_00000005", "id_00000006"]
    q_loader, g_loader = dm.val_dataloader()
    assert next(iter(q_loader))["label"].tolist() == [0, 1, 2]
    assert next(iter(g_loader))["label"].tolist() == [0, 0, 1, 1]
    assert len(dm.predict_dataloader().dataset) == 6  # gallery by default
    with pytest.raises(
        ValueError, match=r"`predict_split` must be one of \('train', 'query', 'gallery'\)"
    ):
        InShopDataModule(str(tmp_path), predict_split="test", **FAST)  # type: ignore[arg-type]
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition\.txt"):
        InShopDataModule(str(tmp_path), **FAST)


def test_missing_benchmark_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CUB-200-2011 root '.*nowhere'"):
        CUB200DataModule(str(tmp_path / "nowhere"))


def test_standard_transform_without_torchvision_names_the_extra() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"lightning-metric\[vision\].*transforms: resize"):
            standard_transform(train=True)
    else:
        pytest.skip("torchvision installed; see test_standard_transforms_shapes")


@pytest.mark.vision
def test_standard_transforms_shapes() -> None:
    pytest.importorskip("torchvision")
    img = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert standard_transform(train=True)(img).shape == (3, 224, 224)
    assert standard_transform(train=False, image_size=64, resize_size=72)(img).shape == (3, 64, 64)


# -- published-recipe configs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cub_proxyanchor", "cars196_proxyanchor", "sop_proxyanchor"])
def test_benchmark_config_print_config_validates(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from lightning_metric.cli import main

    path = CONFIGS / f"{name}.yaml"
    header = path.read_text().split("\nseed_everything", 1)[0]
    # Published figures only with their source, and said plainly which backbone they are for.
    assert "arXiv 2003.13911" in header and "BN-Inception backbone" in header
    paper = {"cub": "68.4", "cars196": "86.1", "sop": "79.1"}[name.split("_")[0]]
    assert f"R@1 = {paper} -- a different backbone from this config" in header
    assert "ResNet-50, as here:" in header
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "embedding_dim: 512" in printed and "m_per_class:" in printed
    # The printed config is itself a valid config that prints back unchanged.
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed


def test_forwarded_arguments_keep_their_defaults_and_reach_hparams(tmp_path: Path) -> None:
    """In-Shop forwards to the benchmark base, to ImageFileDataModule, to ArrayDataModule: each
    level's default and the caller's value arrive, and hparams list every argument once."""
    _write_inshop(tmp_path, [["train", "train"]] * 2 + [["query", "gallery"]] * 2)
    dm = InShopDataModule(str(tmp_path), predict_split="query", seed=5, transforms="resize")
    assert (dm.batch_size, dm.num_workers, dm.image_size, dm.resize_size) == (120, 4, 224, 256)
    assert (dm.seed, dm.transforms, dm.predict_subset, dm.predict_split) == (
        5,
        "resize",
        "query",
        "test",
    )
    assert dm.hparams == {
        "root": str(tmp_path),
        "predict_split": "query",  # the caller's, not the "test" passed to the base
        "batch_size": 120,
        "num_workers": 4,
        "seed": 5,
        "augment": True,
        "eval_batch_size": None,
        "m_per_class": None,
        "num_folds": None,
        "fold": None,
        "image_size": 224,
        "resize_size": 256,
        "transforms": "resize",
        "verify_images": False,
    }
