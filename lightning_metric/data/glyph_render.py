"""Render the glyph benchmark from the fonts matplotlib ships, merge look-alikes, cache it.

The result is a :class:`GlyphTable`: one uint8 image per (class, font) pair. Everything here is
deterministic given the font files, Pillow's FreeType and the render parameters, which is what
the cache key hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import ImageFont

from lightning_metric.checks import check_int

log = logging.getLogger(__name__)

# Bump when the rendering or merging logic changes so stale caches are not reused.
RENDER_VERSION = 1

#: The 16 fonts of the benchmark, in a fixed order (the order is part of the data: font index).
#: The DejaVu *Display* fonts are left out: they hold only a handful of glyphs.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)


#: Below this canvas side the fonts' details no longer tell characters apart.
MIN_IMAGE_SIZE = 8


@dataclass(frozen=True)
class RenderParams:
    """How glyphs are drawn; every field is part of the cache key."""

    image_size: int = 32
    font_size: int = 22
    #: Canvas row of the baseline: glyphs keep their vertical position (x vs X, comma vs
    #: apostrophe differ by it), so we do not crop-and-centre vertically unless a glyph overflows.
    baseline: int = 24
    #: A code point becomes a class when it renders (non-empty) in at least this many fonts.
    min_fonts: int = 12
    #: Per font, two renderings are alike when no pixel differs by more than half the ink range
    #: and the summed absolute difference is below this fraction of their summed ink.
    merge_tolerance: float = 0.05
    #: Two code points merge when they are alike in at least this fraction of their shared
    #: fonts. Not "all": DejaVu draws Latin A, Greek Alpha and Cyrillic A with one outline in 9
    #: of 16 fonts, which makes those images impossible to tell apart even where Serif differs.
    merge_min_fraction: float = 0.5

    @classmethod
    def for_image_size(cls, image_size: int, min_fonts: int = 12) -> RenderParams:
        """Defaults scaled from the 32-pixel design to another canvas size."""
        image_size = check_int("image_size", image_size, minimum=MIN_IMAGE_SIZE)
        return cls(
            image_size=image_size,
            font_size=max(4, round(22 * image_size / 32)),
            baseline=max(1, round(24 * image_size / 32)),
            min_fonts=min_fonts,
        )

    def __post_init__(self) -> None:
        size = check_int("image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        check_int("font_size", self.font_size, minimum=4, maximum=4 * size)
        # A row inside the image.
        check_int("baseline", self.baseline, minimum=1, maximum=size - 1)
        check_int("min_fonts", self.min_fonts, minimum=1, maximum=len(FONT_FILES))
        if not 0.0 <= self.merge_tolerance < 1.0:
            raise ValueError(f"merge_tolerance must be in [0, 1), got {self.merge_tolerance}")
        if not 0.0 < self.merge_min_fraction <= 1.0:
            raise ValueError(f"merge_min_fraction must be in (0, 1], got {self.merge_min_fraction}")


@dataclass
class GlyphTable:
    """All rendered glyphs.

    ``images[i]`` is the rendering of class ``labels[i]`` (a code point ``codepoints[labels[i]]``)
    in font ``FONT_FILES[fonts[i]]``. Rows are sorted by (label, font).
    """

    images: np.ndarray  # uint8 [N, H, W], ink = 255
    labels: np.ndarray  # int64 [N], in [0, len(codepoints))
    fonts: np.ndarray  # int64 [N], index into FONT_FILES
    codepoints: np.ndarray  # int64 [C], the representative code point of each class
    #: code point -> the class representative it was merged into (look-alikes).
    merged: dict[int, int] = field(default_factory=dict)
    #: code points in >= min_fonts cmaps but with fewer than min_fonts non-empty renderings.
    dropped: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.codepoints)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> list[Path]:
    directory = font_dir()
    paths = [directory / name for name in FONT_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"matplotlib's bundled fonts are missing: {missing}; the glyph benchmark needs "
            "the DejaVu and STIXGeneral fonts matplotlib ships in mpl-data/fonts/ttf"
        )
    return paths


def default_cache_dir() -> Path:
    env = os.environ.get("LIGHTNING_METRIC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/lightning_metric").expanduser()


def cache_key(params: RenderParams, paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    # FreeType's hinting and anti-aliasing change pixels between versions, so they key the cache.
    meta = {
        "version": RENDER_VERSION,
        "params": params.__dict__,
        "freetype": ImageFont.core.freetype2_version,
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cmap(path: Path) -> set[int]:
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(str(path)).get_charmap())


def _render_one(font: ImageFont.FreeTypeFont, char: str) -> tuple[np.ndarray, int] | None:
    """Tight ink crop of one glyph and the row of its top relative to the baseline."""
    mask, (_, offset_y) = font.getmask2(char, mode="L", anchor="ls")
    width, height = mask.size
    if width == 0 or height == 0:
        return None
    pixels = np.asarray(mask, dtype=np.uint8).reshape(height, width)
    rows = np.flatnonzero(pixels.any(axis=1))
    cols = np.flatnonzero(pixels.any(axis=0))
    if rows.size == 0:
        return None
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return crop, offset_y + int(rows[0])


def _place(crop: np.ndarray, top: int, params: RenderParams) -> np.ndarray:
    """Put an ink crop on the canvas: centred horizontally, its baseline on ``params.baseline``.

    A glyph that would stick out at the top or bottom is shifted just enough to fit.
    """
    size = params.image_size
    height, width = crop.shape
    row = min(max(params.baseline + top, 0), size - height)
    col = (size - width) // 2
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[row : row + height, col : col + width] = crop
    return canvas


def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one glyph per code point, no shaping, and the same result whether or not
    # Pillow was built with libraqm (raqm also fails outright on lone combining marks).
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def render_glyph(
    path: Path, char: str, params: RenderParams, font: Optional[ImageFont.FreeTypeFont] = None
) -> Optional[np.ndarray]:
    """One glyph on an ``image_size`` canvas (uint8, ink = 255), or None if it renders empty."""
    limit = params.image_size - 2  # a 1-pixel border, so small shifts do not cut ink at once
    font_size = params.font_size
    font = font or _font(path, font_size)
    while True:
        rendered = _render_one(font, char)
        if rendered is None:
            return None
        crop, top = rendered
        height, width = crop.shape
        if (height <= limit and width <= limit) or font_size <= 4:
            break
        # Only oversized glyphs (long arrows, big operators) shrink; everything else keeps one
        # scale so relative size stays a feature (o vs O, comma vs apostrophe).
        font_size = max(4, min(font_size - 1, int(font_size * min(limit / height, limit / width))))
        font = _font(path, font_size)
    return _place(crop[: params.image_size, : params.image_size], top, params)


def _render_all(
    paths: Sequence[Path], codepoints: Sequence[int], params: RenderParams
) -> tuple[np.ndarray, np.ndarray]:
    """Renderings ``[len(codepoints), n_fonts, H, W]`` and a present mask ``[cp, font]``."""
    size = params.image_size
    out = np.zeros((len(codepoints), len(paths), size, size), dtype=np.uint8)
    present = np.zeros((len(codepoints), len(paths)), dtype=bool)
    for f, path in enumerate(paths):
        cmap = _cmap(path)
        font = _font(path, params.font_size)
        for i, cp in enumerate(codepoints):
            if cp not in cmap:
                continue
            image = render_glyph(path, chr(cp), params, font)
            if image is not None:
                out[i, f] = image
                present[i, f] = True
    return out, present


def find_lookalikes(
    images: np.ndarray, present: np.ndarray, tolerance: float, min_fraction: float
) -> list[list[int]]:
    """Groups (indices into the first axis) of code points that look alike, merged transitively.

    ``images``: uint8 ``[C, F, H, W]``; ``present``: bool ``[C, F]``. In one font two renderings
    are *alike* when no pixel differs by more than half the ink range and the summed absolute
    difference is below ``tolerance`` times their summed ink: hinting noise passes, a dot instead
    of an acute accent does not. Two code points look alike when they are alike in at least
    ``min_fraction`` of the fonts they share. Returns sorted groups of size >= 2.
    """
    n, n_fonts = present.shape
    shared = present.astype(np.int32) @ present.T.astype(np.int32)
    alike = np.zeros((n, n), dtype=np.int32)
    for f in range(n_fonts):
        idx = np.flatnonzero(present[:, f])
        x = images[idx, f].reshape(len(idx), -1).astype(np.float32) / 255.0
        ink = x.sum(1)
        # Exact L1 for all pairs is O(n^2 * pixels) in Python-land; one matmul gives sum(d^2),
        # and with |d| <= 1/2 everywhere, sum(d^2) <= sum|d| / 2, so this keeps every alike pair.
        sq = (x * x).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        bound = 0.5 * tolerance * (ink[:, None] + ink[None, :])
        ci, cj = np.nonzero(np.triu(d2 <= bound + 1e-3, k=1))
        diff = np.abs(x[ci] - x[cj])
        ok = (diff.max(1) <= 0.5) & (diff.sum(1) < tolerance * (ink[ci] + ink[cj]))
        alike[idx[ci[ok]], idx[cj[ok]]] += 1
    needed = np.maximum(1, np.ceil(min_fraction * shared - 1e-9))
    ii, jj = np.nonzero(np.triu(alike >= needed, k=1) & (alike > 0))
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(ii.tolist(), jj.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for a in range(n):
        groups.setdefault(root(a), []).append(a)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def build_table(params: RenderParams, paths: Optional[Sequence[Path]] = None) -> GlyphTable:
    """Render every eligible code point in every font and merge look-alikes (no cache)."""
    paths = list(paths) if paths is not None else font_paths()
    counts: dict[int, int] = {}
    for path in paths:
        for cp in _cmap(path):
            counts[cp] = counts.get(cp, 0) + 1
    candidates = sorted(cp for cp, c in counts.items() if c >= params.min_fonts)
    images, present = _render_all(paths, candidates, params)
    keep = present.sum(1) >= params.min_fonts
    dropped = [cp for cp, k in zip(candidates, keep.tolist(), strict=True) if not k]
    codepoints = np.asarray(candidates, dtype=np.int64)[keep]
    images, present = images[keep], present[keep]

    merged: dict[int, int] = {}
    groups = find_lookalikes(images, present, params.merge_tolerance, params.merge_min_fraction)
    absorbed = np.zeros(len(codepoints), dtype=bool)
    for group in groups:
        head, rest = group[0], group[1:]
        for other in rest:
            # The representative keeps its own renderings; a look-alike only fills fonts the
            # representative lacks, so each class still has at most one image per font.
            fill = present[other] & ~present[head]
            images[head, fill] = images[other, fill]
            present[head] |= fill
            merged[int(codepoints[other])] = int(codepoints[head])
            absorbed[other] = True
    codepoints, images, present = codepoints[~absorbed], images[~absorbed], present[~absorbed]

    labels, fonts = np.nonzero(present)  # row-major: sorted by (label, font)
    return GlyphTable(
        images=np.ascontiguousarray(images[labels, fonts]),
        labels=labels.astype(np.int64),
        fonts=fonts.astype(np.int64),
        codepoints=codepoints,
        merged=merged,
        dropped=dropped,
    )


def _save(table: GlyphTable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = np.asarray(sorted(table.merged.items()), dtype=np.int64).reshape(-1, 2)
    # Write to a temp file in the same directory, then rename: os.replace is atomic on POSIX and
    # Windows, so concurrent DDP processes rendering at once never see (or leave) a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                images=table.images,
                labels=table.labels,
                fonts=table.fonts,
                codepoints=table.codepoints,
                merged=merged,
                dropped=np.asarray(table.dropped, dtype=np.int64),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> GlyphTable:
    with np.load(path) as data:
        return GlyphTable(
            images=data["images"],
            labels=data["labels"],
            fonts=data["fonts"],
            codepoints=data["codepoints"],
            merged={int(a): int(b) for a, b in data["merged"]},
            dropped=[int(c) for c in data["dropped"]],
        )


# One table per process and key: several DataModules (or the CLI instantiating one, then
# setup()) share it instead of reloading 30 MB.
_MEMORY: dict[str, GlyphTable] = {}


def load_glyph_table(
    params: Optional[RenderParams] = None,
    cache_dir: Optional[str | os.PathLike[str]] = None,
    use_memory: bool = True,
) -> GlyphTable:
    """The glyph table for ``params``: from memory, else the on-disk cache, else rendered.

    The cache file is ``<cache_dir>/glyphs-<key>.npz`` with ``cache_dir`` defaulting to
    ``$LIGHTNING_METRIC_CACHE`` or ``~/.cache/lightning_metric``; the key hashes the font files,
    FreeType's version and ``params``.
    """
    params = params or RenderParams()
    paths = font_paths()
    key = cache_key(params, paths)
    if use_memory and key in _MEMORY:
        return _MEMORY[key]
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"glyphs-{key}.npz"
    table: Optional[GlyphTable] = None
    if path.is_file():
        try:
            table = _load(path)
        except (OSError, ValueError, KeyError) as err:  # truncated/foreign file: re-render
            log.warning("glyph cache %s unreadable (%s); rendering again", path, err)
    if table is None:
        start = time.perf_counter()
        table = build_table(params, paths)
        log.info(
            "rendered %d glyph images of %d classes in %.1f s; merged %d look-alike code points, "
            "dropped %d with too few non-empty renderings",
            len(table.images),
            table.num_classes,
            time.perf_counter() - start,
            len(table.merged),
            len(table.dropped),
        )
        try:
            _save(table, path)
        except OSError as err:  # read-only home etc.: still usable, just not cached
            log.warning("could not write glyph cache %s: %s", path, err)
    _MEMORY[key] = table
    return table
