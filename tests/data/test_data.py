"""Tests for lightning_metric.data: glyph rendering/merging/caching, splits, batches, digits."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_metric.data import DigitsDataModule, GlyphsDataModule, RandomAffineNoise
from lightning_metric.data import glyph_render as gr
from lightning_metric.data.augment import BatchCollate
from lightning_metric.data.glyphs import split_classes

LATIN_A, GREEK_ALPHA, CYRILLIC_A = 0x41, 0x391, 0x410


@pytest.fixture(scope="session")
def glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("glyph_cache")


@pytest.fixture(scope="session")
def table(glyph_cache: Path) -> gr.GlyphTable:
    # Rendered once per session into a private cache dir (a few seconds), bypassing any
    # in-memory copy so this also exercises the render + write path.
    return gr.load_glyph_table(gr.RenderParams(), cache_dir=glyph_cache, use_memory=False)


def _codepoint_rows(table: gr.GlyphTable, cp: int) -> np.ndarray:
    (label,) = np.flatnonzero(table.codepoints == cp)
    return np.flatnonzero(table.labels == label)


# -- rendering, merging, caching ---------------------------------------------------------------


def test_table_counts_and_invariants(table: gr.GlyphTable) -> None:
    assert 2000 <= table.num_classes <= 2500
    assert 25_000 <= len(table.images) <= 35_000
    assert table.images.dtype == np.uint8 and table.images.shape[1:] == (32, 32)
    # every image has ink; at most one image per (class, font); every class in >= 12 fonts
    assert (table.images.reshape(len(table.images), -1).max(1) > 0).all()
    pairs = table.labels * len(gr.FONT_FILES) + table.fonts
    assert len(np.unique(pairs)) == len(pairs)
    assert np.bincount(table.labels).min() >= 12
    assert len(np.unique(table.codepoints)) == table.num_classes


def test_table_images_match_single_glyph_render(table: gr.GlyphTable) -> None:
    params = gr.RenderParams()
    paths = gr.font_paths()
    for cp in (ord("g"), ord("W"), 0x2211):  # descender, wide letter, big operator
        for row in _codepoint_rows(table, cp)[:3]:
            expected = gr.render_glyph(paths[table.fonts[row]], chr(cp), params)
            np.testing.assert_array_equal(table.images[row], expected)


def test_latin_greek_cyrillic_a_are_merged(table: gr.GlyphTable) -> None:
    assert table.merged[GREEK_ALPHA] == LATIN_A
    assert table.merged[CYRILLIC_A] == LATIN_A
    assert LATIN_A in table.codepoints
    assert GREEK_ALPHA not in table.codepoints and CYRILLIC_A not in table.codepoints
    # still one image per font for the merged class
    assert len(_codepoint_rows(table, LATIN_A)) == len(gr.FONT_FILES)


def test_distinguishable_characters_are_not_merged(table: gr.GlyphTable) -> None:
    for a, b in [("l", "I"), ("O", "0"), ("o", "O"), (",", "'"), ("-", "_"), ("M", "\u1e3e")]:
        assert ord(a) in table.codepoints, a
        assert ord(b) in table.codepoints, b
    assert ord(" ") in table.dropped  # renders empty everywhere
    assert 0 < len(table.merged) < 400


def test_find_lookalikes_needs_half_the_shared_fonts() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random((4, 8, 8)) > 0.5).astype(np.uint8) * 255  # 4 fonts
    other = (rng.random((4, 8, 8)) > 0.5).astype(np.uint8) * 255
    third = (rng.random((8, 8)) > 0.5).astype(np.uint8) * 255
    images = np.stack([base, base.copy(), base.copy(), other])  # 4 code points
    images[1, 3] = third  # cp 1 equals cp 0 in 3 of 4 fonts -> merge
    images[2, 1:] = other[1:]  # cp 2 equals cp 0 in 1 of 4 fonts, cp 3 in 3 of 4
    images[1, 0, 0, 0] ^= 40  # hinting-sized noise does not prevent a merge
    present = np.ones((4, 4), dtype=bool)
    groups = gr.find_lookalikes(images, present, tolerance=0.05, min_fraction=0.5)
    assert groups == [[0, 1], [2, 3]]
    # where cp 2 is missing its single agreeing font is all it shares -> merges
    present[2, 1:] = False
    assert gr.find_lookalikes(images, present, 0.05, 0.5) == [[0, 1, 2]]


def test_cache_roundtrip_is_identical(table: gr.GlyphTable, glyph_cache: Path) -> None:
    files = sorted(glyph_cache.iterdir())
    assert [f.suffix for f in files] == [".npz"]  # no temp files left behind
    loaded = gr.load_glyph_table(gr.RenderParams(), cache_dir=glyph_cache, use_memory=False)
    for name in ("images", "labels", "fonts", "codepoints"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    assert loaded.merged == table.merged and loaded.dropped == table.dropped


def test_unreadable_cache_is_rebuilt(
    table: gr.GlyphTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = gr.RenderParams()
    path = tmp_path / f"glyphs-{gr.cache_key(params, gr.font_paths())}.npz"
    path.write_bytes(b"truncated by a crash")
    monkeypatch.setattr(gr, "build_table", lambda params, paths: table)  # skip re-rendering
    loaded = gr.load_glyph_table(params, cache_dir=tmp_path, use_memory=False)
    assert loaded is table
    np.testing.assert_array_equal(gr._load(path).images, table.images)


def test_cache_key_depends_on_render_params() -> None:
    paths = gr.font_paths()
    assert gr.cache_key(gr.RenderParams(), paths) == gr.cache_key(gr.RenderParams(), paths)
    assert gr.cache_key(gr.RenderParams(), paths) != gr.cache_key(
        gr.RenderParams(font_size=20), paths
    )


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_METRIC_CACHE", str(tmp_path))
    assert gr.default_cache_dir() == tmp_path


# -- GlyphsDataModule --------------------------------------------------------------------------


def _glyphs(glyph_cache: Path, **kwargs: object) -> GlyphsDataModule:
    kwargs.setdefault("batch_size", 32)
    return GlyphsDataModule(cache_dir=str(glyph_cache), **kwargs)  # type: ignore[arg-type]


def test_glyph_splits_are_class_disjoint(table: gr.GlyphTable, glyph_cache: Path) -> None:
    dm = _glyphs(glyph_cache)
    num_classes = dm.num_classes  # available before setup (the CLI links it at instantiation)
    dm.setup("fit")
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    classes = [set(d.classes or []) for d in (train, val, test)]
    assert not classes[0] & classes[1] and not classes[0] & classes[2]
    assert not classes[1] & classes[2]
    assert sum(map(len, classes)) == table.num_classes
    assert num_classes == len(classes[0]) == round(0.65 * table.num_classes)
    assert len(classes[1]) == round(0.175 * table.num_classes)
    assert len(train) + len(val) + len(test) == len(table.images)
    for d in (train, val, test):
        assert d.labels.min() == 0 and d.labels.max() == len(d.classes or []) - 1
        assert len(torch.unique(d.labels)) == len(d.classes or [])
    # labels point at the right code point: every image of label l is a rendering of classes[l]
    row = _codepoint_rows(table, train.classes[5])[0]  # type: ignore[index]
    hits = (train.images[:, 0] == torch.from_numpy(table.images[row])).flatten(1).all(1)
    assert hits.any() and set(train.labels[hits].tolist()) == {5}


def test_glyph_split_depends_on_seed_only(glyph_cache: Path) -> None:
    a, b, c = (_glyphs(glyph_cache, seed=s).class_splits for s in (0, 0, 1))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_max_classes_and_fractions(glyph_cache: Path) -> None:
    dm = _glyphs(glyph_cache, max_classes=100, train_fraction=0.5, val_fraction=0.3)
    train, val, test = dm.class_splits
    assert (len(train), len(val), len(test)) == (50, 30, 20)
    assert dm.num_classes == 50


def test_glyph_batches_have_the_contract_format(glyph_cache: Path) -> None:
    dm = _glyphs(glyph_cache, max_classes=60, batch_size=16)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"x", "label", "index"}
        assert batch["x"].dtype == torch.float32 and batch["x"].shape == (16, 1, 32, 32)
        assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        assert batch["x"].min() >= 0.0 and batch["x"].max() <= 1.0
    assert (dm.image_size, dm.in_channels) == (32, 1)
    # index is the position inside the split dataset (val loader is not shuffled)
    val = dm.dataset("val")
    seen = torch.cat([b["index"] for b in dm.val_dataloader()])
    assert torch.equal(seen, torch.arange(len(val)))
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["label"], val.labels[batch["index"]])
    torch.testing.assert_close(batch["x"], val.images[batch["index"]].float() / 255)
    # predict defaults to the test split
    assert dm.predict_dataloader().dataset is dm.dataset("test")


def test_augmentation_is_deterministic_per_seed(glyph_cache: Path) -> None:
    def first_batch(seed: int, augment: bool = True) -> dict[str, torch.Tensor]:
        dm = _glyphs(glyph_cache, max_classes=60, seed=seed, augment=augment)
        return next(iter(dm.train_dataloader()))

    a, b, c = first_batch(0), first_batch(0), first_batch(0, augment=False)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["index"], b["index"])
    assert torch.equal(a["index"], c["index"])  # same shuffle with and without augmentation
    assert not torch.equal(a["x"], c["x"])
    # augmentation is small: the augmented glyph still correlates strongly with the original
    cos = torch.nn.functional.cosine_similarity(a["x"].flatten(1), c["x"].flatten(1))
    assert cos.mean() > 0.5
    other = first_batch(1)
    assert not torch.equal(a["index"], other["index"])


def test_augmentation_changes_between_epochs() -> None:
    collate = BatchCollate(RandomAffineNoise(), seed=3)
    sample = {"x": torch.rand(1, 16, 16), "label": torch.tensor(0), "index": torch.tensor(0)}
    first, second = collate([sample])["x"], collate([sample])["x"]
    assert not torch.equal(first, second)
    again = BatchCollate(RandomAffineNoise(), seed=3)([sample])["x"]
    assert torch.equal(first, again)


def test_random_affine_identity_when_disabled() -> None:
    x = torch.rand(4, 1, 8, 8)
    aug = RandomAffineNoise(degrees=0, translate=0, scale=(1, 1), shear_degrees=0, noise_std=0)
    torch.testing.assert_close(aug(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "`num_workers` must be an integer >= 0, got -1"),
        ({"train_fraction": 1.5}, "`train_fraction` must be a fraction in \\(0, 1\\), got 1.5"),
        ({"val_fraction": 0.0}, "`val_fraction` must be a fraction in \\(0, 1\\), got 0.0"),
        ({"train_fraction": 0.7, "val_fraction": 0.3}, "0.7 \\+ 0.3"),
        ({"image_size": 4}, "`image_size` must be an integer >= 8, got 4"),
        ({"min_fonts": 17}, "`min_fonts` must be an integer in \\[1, 16\\], got 17"),
        ({"max_classes": 0}, "`max_classes` must be an integer >= 1, got 0"),
        ({"predict_split": "dev"}, "`predict_split` must be one of .* got 'dev'"),
    ],
)
def test_glyphs_bad_input(kwargs: dict[str, object], match: str) -> None:
    kwargs.setdefault("batch_size", 8)
    with pytest.raises(ValueError, match=match):
        GlyphsDataModule(**kwargs)  # type: ignore[arg-type]


def test_split_leaving_an_empty_split_raises() -> None:
    with pytest.raises(ValueError, match="leave an empty split .*test 0"):
        split_classes(3, 0.65, 0.3, seed=0)


def test_batch_larger_than_train_split_raises(glyph_cache: Path) -> None:
    dm = _glyphs(glyph_cache, max_classes=20, batch_size=10_000)
    with pytest.raises(ValueError, match="batch_size 10000 is larger than the training split"):
        dm.train_dataloader()


def test_bad_augment_settings_raise() -> None:
    with pytest.raises(ValueError, match="scale must be .* got \\(1.2, 1.1\\)"):
        RandomAffineNoise(scale=(1.2, 1.1))
    with pytest.raises(ValueError, match="noise_std must be >= 0, got -0.1"):
        RandomAffineNoise(noise_std=-0.1)


# -- DigitsDataModule --------------------------------------------------------------------------


def test_digits_default_split() -> None:
    dm = DigitsDataModule(batch_size=32)
    assert dm.num_classes == 5 and dm.image_size == 8 and dm.in_channels == 1
    dm.setup()
    train, val, test = (dm.datasets[s] for s in ("train", "val", "test"))
    assert train.classes == [0, 1, 2, 3, 4] and val.classes == test.classes == [5, 6, 7, 8, 9]
    assert set(train.labels.tolist()) == set(range(5))
    assert set(val.labels.tolist()) == set(test.labels.tolist()) == set(range(5))
    assert len(train) + len(val) + len(test) == 1797
    assert abs(len(val) - len(test)) <= 5
    # val and test hold different images (disjoint samples of the same unseen digits)
    val_set = {tuple(v.flatten().tolist()) for v in val.images}
    overlap = sum(tuple(t.flatten().tolist()) in val_set for t in test.images)
    assert overlap < 10  # sklearn's digits contain a few exact duplicate images
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= 0.0 and batch["x"].max() <= 1.0
    assert torch.equal(batch["label"], train.labels[batch["index"]])


def test_digits_custom_classes() -> None:
    dm = DigitsDataModule(batch_size=16, train_classes=[1, 7], eval_classes=[3, 8, 9])
    assert dm.num_classes == 2
    dm.setup()
    assert dm.dataset("train").classes == [1, 7] and dm.dataset("val").classes == [3, 8, 9]


def test_digits_workers_are_deterministic() -> None:
    def batches() -> list[torch.Tensor]:
        dm = DigitsDataModule(batch_size=128, num_workers=2, seed=5)
        return [b["x"] for b in dm.train_dataloader()][:3]

    for a, b in zip(batches(), batches(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_classes": [0, 10]}, "train_classes must be a non-empty list of digits 0-9"),
        ({"train_classes": []}, "train_classes must be a non-empty list"),
        ({"train_classes": [1, 1]}, "must not repeat a digit, got \\[1, 1\\]"),
        ({"train_classes": [0, 1], "eval_classes": [1, 2]}, "overlap in \\[1\\]"),
        ({"train_classes": list(range(10))}, "none are left to evaluate on"),
        ({"val_fraction": 1.0}, "`val_fraction` must be a fraction in \\(0, 1\\), got 1.0"),
        ({"batch_size": -3}, "`batch_size` must be an integer >= 1, got -3"),
    ],
)
def test_digits_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


class _TinyModel(pl.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
        self.seen_val: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.seen_val.append(batch["index"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_digits_train_with_lightning(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=64)
    model = _TinyModel(dm.num_classes)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert torch.equal(torch.cat(model.seen_val), torch.arange(len(dm.dataset("val"))))


SHARED = ("batch_size", "num_workers", "seed", "augment", "eval_batch_size", "predict_split")


@pytest.mark.parametrize(
    ("cls", "own", "batch_size"),
    [
        (DigitsDataModule, ("train_classes", "eval_classes", "val_fraction"), 64),
        (GlyphsDataModule, ("train_fraction", "min_fonts", "max_classes", "cache_dir"), 256),
    ],
)
def test_forwarded_arguments_are_in_the_cli_schema_and_the_hparams(
    cls: type, own: tuple[str, ...], batch_size: int
) -> None:
    """The shared arguments reach ArrayDataModule as **kwargs: LightningCLI (jsonargparse)
    must still list each with its type and default, and hparams must still hold them all."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    actions = {a.dest.removeprefix("data."): a for a in parser._actions}
    for name in (*SHARED, "m_per_class", *own):
        assert name in actions, name
        assert actions[name].help, f"{name} has no help text"
    assert actions["batch_size"].default == batch_size  # the subclass's own default wins
    assert actions["num_workers"].default == 0 and actions["seed"].default == 0
    config = parser.parse_args(["--data.seed=7", "--data.m_per_class=4"])
    assert config.data.seed == 7 and config.data.m_per_class == 4

    dm = cls(seed=7, m_per_class=4)
    assert dm.seed == 7 and dm.m_per_class == 4 and dm.batch_size == batch_size
    assert set(dm.hparams) >= {*SHARED, "m_per_class", *own}
    assert dm.hparams["seed"] == 7 and dm.hparams["num_workers"] == 0
    with pytest.raises(TypeError, match="seeds"):
        cls(seeds=7)
