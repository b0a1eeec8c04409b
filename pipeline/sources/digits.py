"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the offline default."""

from collections.abc import Iterator

import numpy as np
from pydantic import Field

from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

_TOTAL = 1797  # images in scikit-learn's bundled set


class DigitsConfig(SourceConfig):
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of images held out as the test split.")
    seed: int = Field(0, description="Seed of the train/test permutation.")


class DigitsSource(Source):
    """Images are 0..16 intensities in scikit-learn; they are rescaled to 0..255 uint8, shape (8, 8, 1)."""

    name = "digits"
    Config = DigitsConfig

    def splits(self) -> list[str]:
        return ["train", "test"]

    def _chosen(self, split: str) -> np.ndarray:
        order = np.random.default_rng(self.config.seed).permutation(_TOTAL)
        n_test = int(round(_TOTAL * self.config.test_fraction))
        return np.sort(order[:n_test] if split == "test" else order[n_test:])

    def num_records(self, split: str) -> int:
        self._check_split(split)
        return len(self._chosen(split))

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        from sklearn.datasets import load_digits  # heavy import, only when ingesting

        self._check_split(split)
        data = load_digits()
        images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
        for i in self._chosen(split)[start:stop]:
            yield Record(key=f"digits-{i:05d}", image=images[i], label=int(data.target[i]))
