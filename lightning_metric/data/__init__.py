"""DataModules for metric learning (glyphs, digits, image folders, benchmark layouts), their
class-disjoint cross-validation folds and the preprocessing record their evaluation transforms
are."""

from lightning_metric.data.augment import RandomAffineNoise
from lightning_metric.data.base import ArrayDataModule, ArrayDataset, ResumableDataLoader
from lightning_metric.data.digits import DigitsDataModule
from lightning_metric.data.folds import class_folds, select_classes
from lightning_metric.data.glyphs import GlyphsDataModule
from lightning_metric.data.preprocess import Preprocessing, PreprocessingError
from lightning_metric.data.samplers import EpochShuffleSampler, MPerClassSampler

__all__ = [
    "ArrayDataModule",
    "ArrayDataset",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "GlyphsDataModule",
    "MPerClassSampler",
    "Preprocessing",
    "PreprocessingError",
    "RandomAffineNoise",
    "ResumableDataLoader",
    "class_folds",
    "select_classes",
]

from lightning_metric.data.benchmarks import (  # noqa: E402
    Cars196DataModule,
    CUB200DataModule,
    InShopDataModule,
    SOPDataModule,
)
from lightning_metric.data.folders import ImageFileDataset, ImageFolderDataModule  # noqa: E402

__all__ += [
    "CUB200DataModule",
    "Cars196DataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "InShopDataModule",
    "SOPDataModule",
]
