"""`arrays`: images in `.npy` / `.npz` / MATLAB `.mat` files, (N, H, W), (N, H, W, C) or (N, C, H, W), optional
labels.

One file per split (`files: {train: a.npz, test: b.npz}`). An `.npz` or `.mat` holds the images under
`images_key` and, when present, labels under `labels_key` and factors under `factors_key`; only those arrays
are read (dSprites' `.npz` also holds an object array `metadata`, which is never loaded). An `.npy` holds
only images, with labels from a separate `.npy` in `labels`. `.npy` files are memory-mapped, so a shard
group reads only its rows. A file's kind comes from its first bytes, not its name. `.mat` files (MATLAB
v4 to v7.2) are read through `scipy.io.loadmat`; nothing is ever unpickled.

Binary masks: uint8 arrays whose values are all 0 or 1 (dSprites' `imgs`) are stored as 0 and 255 under
`binary: auto` (the default, with a warning) or `scale`, as they are under `keep`; bool arrays are always
0 and 255.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.records import Record
from pipeline.sources import Source, SourceConfig

_CHANNELS = (1, 3, 4)
_SCAN_BYTES = 64 << 20  # rows read at a time when looking for a binary mask: bounded memory on a memory map
log = logging.getLogger(__name__)


class ArraysConfig(SourceConfig):
    files: dict[str, Path] = Field(description="Split name -> .npy, .npz or .mat file of images.")
    labels: dict[str, Path] = Field(default_factory=dict, description="Split name -> .npy of labels (N,), optional.")
    images_key: str = Field("images", description="Array name of the images in an .npz/.mat (or its only array).")
    labels_key: str = Field("labels", description="Array name of the labels in an .npz/.mat, used when present.")
    factors_key: str = Field("factors", description="Array name of per-sample factors (N, K) in an .npz/.mat, if any.")
    layout: Literal["auto", "NHW", "NHWC", "NCHW"] = Field(
        "auto", description="Axis order; auto: 3-D is NHW, 4-D is NHWC when the last axis is 1, 3 or 4, else NCHW."
    )
    binary: Literal["auto", "scale", "keep"] = Field(
        "auto", description="uint8 images holding only 0 and 1 (binary masks): auto: when the maximum over the whole "
        "array is 1, store them as 0/255 and log a warning; scale: always store x * 255 (an error if a value is "
        "above 1); keep: store the values as they are. bool images are always 0/255.",
    )


def _kind(path: Path) -> str:
    """'npy', 'npz' or 'mat' from the file's first bytes (a name can lie), or a SourceError saying what it is."""
    if not path.is_file():
        raise SourceError(f"arrays source: {path} does not exist or is not a file; check source.options.files")
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK"):
        return "npz"
    # MATLAB v5+ files open with a text header; v4 files have none, so their suffix is all there is to go by
    if head.startswith(b"MATLAB") or path.suffix.lower() == ".mat":
        return "mat"
    raise SourceError(
        f"arrays source: {path} is not a .npy, .npz or MATLAB .mat file (it starts with {head[:16]!r}); "
        "save the images with np.save or np.savez"
    )


def _object_array(path: Path, key: str) -> SourceError:
    name = f"array {key!r} in {path}" if key else str(path)
    return SourceError(
        f"arrays source: {name} is an object array (Python objects), which this source never loads; store the "
        "images as a numeric uint8 array (or point source.options.images_key / labels_key at one)"
    )


def _read_npz(path: Path, keys: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    with np.load(path, allow_pickle=False) as z:
        names = list(z.files)
        wanted = [k for k in keys if k in names] or (names if len(names) == 1 else [])
        out = {}
        for key in wanted:  # NpzFile reads a member only when asked for it: unrelated arrays stay unread
            try:
                out[key] = z[key]
            except ValueError:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
                raise _object_array(path, key) from None
    return out, names


def _read_mat(path: Path, keys: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    convert = (f"or convert it in Python: m = scipy.io.loadmat('{path.name}'); "
               f"np.savez('{path.stem}.npz', images=m['<name>'])")
    try:
        import scipy.io
    except ImportError:
        raise SourceError(f"arrays source: {path} is a MATLAB .mat file; install scipy to read it (pip install "
                          f"scipy), {convert}") from None
    try:
        names = [name for name, _, _ in scipy.io.whosmat(path)]
        wanted = [k for k in keys if k in names] or (names if len(names) == 1 else [])
        data = scipy.io.loadmat(path, variable_names=wanted) if wanted else {}
    except NotImplementedError:  # scipy: "Please use HDF reader for matlab v7.3 files"
        raise SourceError(
            f"arrays source: {path} is a MATLAB v7.3 file (HDF5 inside), which scipy cannot read; in MATLAB, "
            f"save it again with save('{path.name}', '-v7'), or read it with h5py and np.savez the arrays (h5py "
            "returns them with their axes reversed)"
        ) from None
    except (ValueError, TypeError, OSError) as err:
        raise SourceError(f"arrays source: {path} looks like a MATLAB .mat file but does not read ({err}); "
                          f"{convert}") from None
    out = {k: data[k] for k in wanted}
    for key, value in out.items():
        if value.dtype == object:  # a cell array or struct
            raise _object_array(path, key)
    return out, names


def _read(path: Path, keys: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays `keys` of the file that exist (or its only array), and the names of all it holds.

    An `.npy` gives its one array under the key "".
    """
    kind = _kind(path)
    try:
        if kind == "npz":
            return _read_npz(path, keys)
        if kind == "mat":
            return _read_mat(path, keys)
        return {"": np.load(path, mmap_mode="r", allow_pickle=False)}, [""]
    except ValueError as err:
        if isinstance(err, SourceError):
            raise
        if "pickle" in str(err) or "object" in str(err).lower():
            raise _object_array(path, "") from None
        raise SourceError(f"arrays source: {path} is not a readable .{kind} file ({err})") from None
    except OSError as err:
        raise SourceError(f"arrays source: {path} is not a readable .{kind} file ({err})") from None


def _scan_max(images: np.ndarray) -> int:
    """The maximum of a uint8 array, or some value above 1 as soon as one is seen; ~64 MB of rows at a time.

    An 8-bit image array is told apart in its first chunk; a mask is read once in full, a chunk at a time, so a
    memory-mapped dSprites (3 GB) never sits in memory whole.
    """
    rows = max(1, _SCAN_BYTES // max(1, images[:1].nbytes))
    top = 0
    for start in range(0, len(images), rows):
        top = max(top, int(images[start : start + rows].max()))
        if top > 1:
            break
    return top


_SCANNED: dict[tuple[str, str, int, int], int] = {}  # (path, key, size, mtime) -> _scan_max: one scan per process


def _stored_times_255(images: np.ndarray, path: Path, key: str, rule: str) -> bool:
    """Whether uint8 `images` are stored x 255 under `source.options.binary` = `rule` (see ArraysConfig)."""
    if rule == "keep":
        return False
    stat = path.stat()
    version = (str(path), key, stat.st_size, stat.st_mtime_ns)
    if version not in _SCANNED:
        _SCANNED[version] = top = _scan_max(images)
        if rule == "auto" and top == 1:
            log.warning("arrays source: %s holds uint8 values 0 and 1 only: a binary mask, stored as 0 and 255; "
                        "set source.options.binary=keep to store the values as they are", path)
    top = _SCANNED[version]
    if rule == "scale" and top > 1:
        raise SourceError(f"arrays source: {path} holds values above 1, so it is not a 0/1 mask; "
                          "set source.options.binary=auto or keep")
    return top == 1


def _layout(shape: tuple[int, ...], requested: str, path: Path) -> str:
    if requested != "auto":
        if len(shape) != len(requested):
            raise SourceError(f"arrays source: {path} has shape {shape}, which is not {requested}")
        return requested
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        last, first = shape[3] in _CHANNELS, shape[1] in _CHANNELS
        if last and first and shape[1] != shape[3]:
            raise SourceError(
                f"arrays source: {path} has shape {shape}: both axis 1 and axis 3 could be channels; "
                "set source.options.layout to NHWC or NCHW"
            )
        if last or first:
            return "NHWC" if last else "NCHW"
    raise SourceError(
        f"arrays source: {path} has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4"
    )


class ArraysSource(Source):
    name = "arrays"
    Config = ArraysConfig

    def splits(self) -> list[str]:
        if not self.config.files:
            raise SourceError("arrays source: source.options.files is empty; give {split: path} for each split")
        return list(self.config.files)

    def _arrays(self, split: str) -> tuple[np.ndarray, str, bool, np.ndarray | None, np.ndarray | None]:
        """Images, their layout, whether they are stored x 255, labels and factors of `split`."""
        self._check_split(split)
        cfg, path = self.config, self.config.files[split]
        arrays, names = _read(path, [cfg.images_key, cfg.labels_key, cfg.factors_key])
        if "" in arrays:
            key = ""
        elif cfg.images_key in arrays:
            key = cfg.images_key
        elif len(names) == 1:
            key = names[0]
        else:
            raise SourceError(
                f"arrays source: {path} has no array {cfg.images_key!r} (it has {sorted(names)}); "
                "set source.options.images_key"
            )
        images = arrays[key]
        if images.dtype == np.bool_:
            times_255 = True
        elif images.dtype == np.uint8:
            times_255 = _stored_times_255(images, path, key, cfg.binary)
        else:
            raise SourceError(
                f"arrays source: {path} holds {images.dtype} images; store uint8 0..255 "
                "(e.g. np.rint(x * 255).astype(np.uint8) for floats in [0, 1])"
            )
        layout = _layout(images.shape, cfg.layout, path)
        labels = arrays.get(cfg.labels_key) if key != cfg.labels_key else None
        if split in cfg.labels:
            labels = _read(cfg.labels[split], [])[0].get("")
            if labels is None:
                raise SourceError(f"arrays source: labels file {cfg.labels[split]} must be a .npy of shape (N,)")
        if labels is not None and labels.ndim == 2 and 1 in labels.shape:  # MATLAB's (N, 1) or (1, N) columns
            labels = labels.reshape(-1)
        factors = arrays.get(cfg.factors_key) if key != cfg.factors_key else None
        for what, extra in (("labels", labels), ("factors", factors)):
            if extra is not None and len(extra) != len(images):
                raise SourceError(f"arrays source: {len(images)} images in {path} but {len(extra)} {what}")
        if labels is not None and not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"arrays source: labels for {split!r} are {labels.dtype}; class indices must be integers")
        return images, layout, times_255, labels, factors

    def num_records(self, split: str) -> int:
        return len(self._arrays(split)[0])

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        images, layout, times_255, labels, factors = self._arrays(split)
        for i in range(*slice(start, stop).indices(len(images))):
            image = np.asarray(images[i], np.uint8)
            if times_255:  # a 0/1 mask (or bool): 0 -> 0, 1 -> 255
                image = image * np.uint8(255)
            image = image[..., None] if layout == "NHW" else image.transpose(1, 2, 0) if layout == "NCHW" else image
            yield Record(
                key=f"{split}-{i:07d}",
                image=np.ascontiguousarray(image),
                label=None if labels is None else int(labels[i]),
                factors=None if factors is None else np.asarray(factors[i], np.float32),
            )
