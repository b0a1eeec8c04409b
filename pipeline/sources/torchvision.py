"""`torchvision`: any `torchvision.datasets` image class by name, downloading when online."""

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.records import Record
from pipeline.sources import Source, SourceConfig


class TorchvisionConfig(SourceConfig):
    dataset: str = Field(description="Class name in torchvision.datasets, e.g. 'MNIST', 'FashionMNIST', 'CIFAR10'.")
    root: Path = Field(Path("data/torchvision"), description="Where torchvision keeps (or downloads) the files.")
    download: bool = Field(False, description="Download when missing (needs network access).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra constructor arguments for every split.")
    splits: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Split name -> constructor arguments. Default: derived from the class's `train` or `split` "
        "argument as {'train': ..., 'test': ...}, or a single 'train' split when it has neither.",
    )


def _image_dataset_classes() -> dict[str, type]:
    import torchvision.datasets as tvd

    return {n: c for n, c in vars(tvd).items() if isinstance(c, type) and issubclass(c, tvd.VisionDataset)}


def _to_uint8_hwc(image: Any) -> np.ndarray:
    """PIL image or tensor -> uint8 (H, W, C)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:  # e.g. FakeData with a ToTensor transform; keep the contract explicit
        raise SourceError(f"torchvision source: expected uint8 images, got {arr.dtype}; drop the transform")
    return arr[..., None] if arr.ndim == 2 else arr


class TorchvisionSource(Source):
    name = "torchvision"
    Config = TorchvisionConfig

    def _class(self) -> type:
        classes = _image_dataset_classes()
        if self.config.dataset not in classes:
            raise SourceError(
                f"torchvision has no dataset {self.config.dataset!r}; valid: {', '.join(sorted(classes))}"
            )
        return classes[self.config.dataset]

    def _split_arguments(self) -> dict[str, dict[str, Any]]:
        if self.config.splits is not None:
            return self.config.splits
        params = inspect.signature(self._class()).parameters
        if "train" in params:
            return {"train": {"train": True}, "test": {"train": False}}
        if "split" in params:
            return {"train": {"split": "train"}, "test": {"split": "test"}}
        return {"train": {}}

    def splits(self) -> list[str]:
        return list(self._split_arguments())

    def num_records(self, split: str) -> int:
        return len(self._dataset(split))

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        dataset = self._dataset(split)
        for i in range(*slice(start, stop).indices(len(dataset))):
            image, target = dataset[i]
            label = int(target) if isinstance(target, (int, np.integer)) else None
            yield Record(key=f"{split}-{i:06d}", image=_to_uint8_hwc(image), label=label)

    def _dataset(self, split: str):
        self._check_split(split)
        cls = self._class()
        kwargs = {**self.config.kwargs, **self._split_arguments()[split]}
        params = inspect.signature(cls).parameters
        if "root" in params:
            kwargs["root"] = str(self.config.root)
        if "download" in params:
            kwargs["download"] = self.config.download
        try:
            dataset = cls(**kwargs)
        except RuntimeError as err:  # torchvision's "Dataset not found. You can use download=True"
            raise SourceError(
                f"torchvision {self.config.dataset} ({split}) could not be opened under {self.config.root}: {err}. "
                "Set source.options.download=true when online, or point source.options.root at the files."
            ) from err
        return dataset
