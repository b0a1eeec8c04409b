"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), the offline default."""

from collections.abc import Iterator

import numpy as np
from pydantic import Field

from pipeline.records import Record
from pipeline.sources import Source, SourceConfig


class DigitsConfig(SourceConfig):
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of images held out as the test split.")
    seed: int = Field(0, description="Seed of the train/test permutation.")


class DigitsSource(Source):
    """Images are 0..16 intensities in scikit-learn; they are rescaled to 0..255 uint8, shape (8, 8, 1)."""

    name = "digits"
    Config = DigitsConfig

    def splits(self) -> list[str]:
        return ["train", "test"]

    def records(self, split: str) -> Iterator[Record]:
        from sklearn.datasets import load_digits  # heavy import, only when ingesting

        self._check_split(split)
        data = load_digits()
        images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
        order = np.random.default_rng(self.config.seed).permutation(len(images))
        n_test = int(round(len(images) * self.config.test_fraction))
        chosen = np.sort(order[:n_test] if split == "test" else order[n_test:])
        for i in chosen:
            yield Record(key=f"digits-{i:05d}", image=images[i], label=int(data.target[i]))
