"""`shapes`: procedural 2-D sprites with known generative factors (the dSprites design), 64x64 binary.

Factors, stored per sample in this order: shape (0 square, 1 ellipse, 2 heart), scale (0.5 .. 1),
orientation (radians, 0 .. 2 pi), x and y position (0 .. 1). Each factor takes values on a grid as in
dSprites (3 x 6 x 40 x 32 x 32); each split draws `num_samples` grid points uniformly with its own seed,
so a given (seed, split) gives the same images on every machine. The label is the shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydantic import Field

from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

SHAPES = ("square", "ellipse", "heart")


class ShapesConfig(SourceConfig):
    train_samples: int = Field(20000, gt=0, description="Images in the train split.")
    test_samples: int = Field(2000, ge=0, description="Images in the test split (0: no test split).")
    size: int = Field(64, ge=16, description="Image side in pixels.")
    scales: int = Field(6, gt=0, description="Grid points of the scale factor (0.5 .. 1).")
    orientations: int = Field(40, gt=0, description="Grid points of the orientation factor (0 .. 2 pi).")
    positions: int = Field(32, gt=0, description="Grid points of the x and of the y factor (0 .. 1).")
    seed: int = Field(0, description="Seed of the factor draws.")


def render(shape: int, scale: float, orientation: float, x: float, y: float, size: int) -> np.ndarray:
    """One sprite as uint8 (size, size, 1), 0 or 255: the pixel centres inside the rotated, scaled shape."""
    margin = 0.2 * size  # the largest sprite at the edge positions still fits
    cx, cy = margin + x * (size - 2 * margin), margin + y * (size - 2 * margin)
    half = 0.16 * size * scale  # half the side of the unit square, in pixels
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (cols - cx) / half, (rows - cy) / half
    c, s = np.cos(orientation), np.sin(orientation)
    u, v = c * dx + s * dy, -s * dx + c * dy  # into the sprite's own frame
    if shape == 0:
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == 1:
        inside = u**2 + (v / 0.5) ** 2 <= 1
    else:  # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y pointing up, scaled to about the square's extent
        hx, hy = u * 1.2, -v * 1.2 + 0.2
        inside = (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    return (inside.astype(np.uint8) * 255)[..., None]


class ShapesSource(Source):
    name = "shapes"
    Config = ShapesConfig
    factor_names = ("shape", "scale", "orientation", "x", "y")

    def splits(self) -> list[str]:
        return ["train", "test"] if self.config.test_samples else ["train"]

    def num_records(self, split: str) -> int:
        self._check_split(split)
        return self.config.train_samples if split == "train" else self.config.test_samples

    def factors(self, split: str) -> np.ndarray:
        """The split's factor values (N, 5) float32, a pure function of (seed, split)."""
        cfg = self.config
        n = self.num_records(split)
        rng = np.random.default_rng([cfg.seed, self.splits().index(split)])
        grid = (len(SHAPES), cfg.scales, cfg.orientations, cfg.positions, cfg.positions)
        idx = np.stack([rng.integers(0, k, n) for k in grid], axis=1)
        values = np.empty((n, 5), np.float32)
        values[:, 0] = idx[:, 0]
        values[:, 1] = 0.5 + 0.5 * idx[:, 1] / max(cfg.scales - 1, 1)
        values[:, 2] = 2 * np.pi * idx[:, 2] / cfg.orientations
        values[:, 3] = idx[:, 3] / max(cfg.positions - 1, 1)
        values[:, 4] = idx[:, 4] / max(cfg.positions - 1, 1)
        return values

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        factors = self.factors(split)
        for i in range(*slice(start, stop).indices(len(factors))):
            f = factors[i]
            image = render(int(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[4]), self.config.size)
            yield Record(key=f"{split}-{i:07d}", image=image, label=int(f[0]), factors=f.copy())
