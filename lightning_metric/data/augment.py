"""Batched training augmentation in plain torch (no torchvision): small random affine + noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from lightning_metric.data.samplers import derive_seed


class RandomAffineNoise:
    """Per-sample random rotation, scale, shear and shift, then additive Gaussian noise.

    Works on a whole batch ``[B, C, H, W]`` of float images in ``[0, 1]`` at once (one
    ``affine_grid`` + ``grid_sample``), which is much cheaper than per-image transforms in the
    DataLoader. ``translate`` is a fraction of the image side, so the same settings suit 8x8
    digits and 32x32 glyphs. Randomness comes only from the ``generator`` passed in.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.06,
        scale: tuple[float, float] = (0.9, 1.1),
        shear_degrees: float = 8.0,
        noise_std: float = 0.05,
    ) -> None:
        if not 0.0 <= degrees <= 180.0:
            raise ValueError(f"degrees must be in [0, 180], got {degrees}")
        if not 0.0 <= translate < 0.5:
            raise ValueError(
                f"translate must be a fraction of the image side in [0, 0.5), got {translate}"
            )
        low, high = scale
        if not 0.0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if not 0.0 <= shear_degrees < 45.0:
            raise ValueError(f"shear_degrees must be in [0, 45), got {shear_degrees}")
        if noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.degrees = degrees
        self.translate = translate
        self.scale = (low, high)
        self.shear_degrees = shear_degrees
        self.noise_std = noise_std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(degrees={self.degrees}, translate={self.translate}, "
            f"scale={self.scale}, shear_degrees={self.shear_degrees}, noise_std={self.noise_std})"
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if batch == 0:
            return x

        def uniform(low: float, high: float) -> torch.Tensor:
            u = torch.rand(batch, generator=generator, dtype=torch.float32)
            return (low + (high - low) * u).to(x.device)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180.0)
        shear = uniform(-self.shear_degrees, self.shear_degrees) * (math.pi / 180.0)
        # Zoom factor is sampled on a log scale so zoom-in and zoom-out are equally likely.
        log_low, log_high = math.log(self.scale[0]), math.log(self.scale[1])
        zoom = torch.exp(uniform(log_low, log_high))
        # affine_grid works in [-1, 1] coordinates: a shift of t * side is 2 * t there.
        shift_x = uniform(-self.translate, self.translate) * 2.0
        shift_y = uniform(-self.translate, self.translate) * 2.0

        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # The grid maps output pixels to input pixels, i.e. the inverse transform: dividing by
        # the zoom enlarges the glyph when zoom > 1.
        theta = torch.zeros(batch, 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0] = cos / zoom
        theta[:, 0, 1] = (cos * tan - sin) / zoom
        theta[:, 1, 0] = sin / zoom
        theta[:, 1, 1] = (sin * tan + cos) / zoom
        theta[:, 0, 2] = shift_x
        theta[:, 1, 2] = shift_y
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(
            x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        if self.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(x.device)
            out = out + self.noise_std * noise
        return out.clamp_(0.0, 1.0).to(x.dtype)


class BatchCollate:
    """Collates ``{"x", "label", "index"}`` samples and optionally augments the whole batch.

    Where the augmentation's randomness comes from:

    - ``per_batch_seed=True`` (what the DataModules' training loaders use): each batch's
      generator is seeded from ``seed`` and the batch's ordered dataset indices. The sampler
      makes those indices a fixed function of (seed, epoch, rank, position in the epoch), so
      the augmentation of every batch is too: it is the same whichever DataLoader worker
      builds the batch, however many workers there are, and after resuming from a checkpoint
      (no generator state has to be saved, which for workers would be impossible: their
      generators live in the worker processes and run ahead of the model by the prefetch).
      Calling it twice on the same batch gives the same augmentation.
    - ``per_batch_seed=False``: in the main process the generator is seeded with ``seed`` and
      keeps running across calls. In a worker it is seeded with that worker's seed, which
      torch derives from the DataLoader's ``generator``. Fixed by the seed for a run from
      scratch, but a resumed run restarts the stream (not exact on resume).
    """

    def __init__(
        self,
        augment: Optional[RandomAffineNoise] = None,
        seed: int = 0,
        per_batch_seed: bool = False,
    ) -> None:
        self.augment = augment
        self.seed = seed
        self.per_batch_seed = per_batch_seed
        self._generator: Optional[torch.Generator] = None
        self._generator_seed: Optional[int] = None

    def generator(self) -> torch.Generator:
        info = get_worker_info()
        seed = info.seed if info is not None else self.seed
        if self._generator is None or self._generator_seed != seed:
            self._generator = torch.Generator().manual_seed(seed % (2**63))
            self._generator_seed = seed
        return self._generator

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([s[key] for s in samples]) for key in ("x", "label", "index")}
        if self.augment is not None:
            if self.per_batch_seed:
                seed = derive_seed("augment", self.seed, batch["index"])
                generator = torch.Generator().manual_seed(seed)
            else:
                generator = self.generator()
            batch["x"] = self.augment(batch["x"], generator)
        return batch
