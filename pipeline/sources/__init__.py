"""Source plugins, found through the `vaepipe.sources` entry-point group.

The built-ins are declared in pyproject.toml exactly as a third-party package would declare its own, so
adding a source never means touching this repository. The registry is a plain dict built once per process;
unknown and duplicate names fail loudly and list what is there.

This package owns reading inputs as `Record`s: the plugins, their configs and the registry. A plugin imports
this face, `pipeline.records`, `pipeline.errors` and `pipeline.conform` (decoding images) only: never the shard
format, the ingest, the loader, `pipeline.settings` (which validates through this registry), `vae` or `flows`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.conform import DEFAULT_MAX_PIXELS
from pipeline.errors import SourceError
from pipeline.records import Record, Rejected

ENTRY_POINT_GROUP = "vaepipe.sources"


class SourceConfig(BaseModel):
    """Base of every source's typed config; unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Source:
    """A source yields `Record`s per split. Subclasses set `name` and `Config` and implement `splits` and
    `records`.

    `records(split, start, stop)` yields the inputs [start, stop) of the split in a deterministic order: a
    `Record` each, or a `Rejected` for an input that gives no image (a corrupt file), so that the ingest's
    policy decides and nothing disappears silently. A source that can say how many inputs a split has
    (`num_records`) is ingested in parallel, one task per group of shards. One that cannot (None, the default)
    but can name independent parts of the split (`parts`: its input files) is ingested by one task per part,
    each reading `part_records`; otherwise by one task per split, and its `records` is called with start=0,
    stop=None only.

    A source of image files reads no image of more than `max_pixels` (W x H): it yields a Rejected('oversized')
    from the file's header (`pipeline.conform.decode_source` does this) and leaves it out of its `shapes` survey.
    The ingest sets it from ingest.max_pixels (`build_source`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[SourceConfig]] = SourceConfig
    factor_names: ClassVar[tuple[str, ...]] = ()  # names of Record.factors' entries, when the source has them
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected unread (see above)

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    def splits(self) -> list[str]:
        """The split names this source provides, e.g. ["train", "test"]."""
        raise NotImplementedError

    def num_records(self, split: str) -> int | None:
        """How many inputs `split` has (Records plus Rejected), or None when unknown without reading them all."""
        return None

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record | Rejected]:
        """Yield the inputs [start, stop) of `split` (stop None: to the end), in a deterministic order."""
        raise NotImplementedError

    def parts(self, split: str) -> list[str]:
        """Names of independent parts of `split` (its input files), in the split's order: `part_records` of each
        in turn yields what `records(split)` yields. [] (the default): the split is read as one."""
        return []

    def part_records(self, split: str, part: str) -> Iterator[Record | Rejected]:
        """Yield the inputs of one of `parts(split)`, in order."""
        raise NotImplementedError(f"source {self.name!r} names no parts of its splits")

    def shapes(self, split: str) -> Counter[tuple[int, int, int]] | None:
        """How many inputs of `split` have each (H, W, C), from file headers without decoding pixels; None (the
        default) when the source cannot tell cheaply. The ingest picks the dataset's shape from this survey (the
        most common one) instead of from whichever input comes first."""
        return None

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise SourceError(f"source {self.name!r} has no split {split!r}; it has {self.splits()}")


@functools.cache
def available_sources() -> dict[str, Any]:
    """Name -> entry point, for every installed source. Two packages claiming one name is an error."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise SourceError(
                f"source name {ep.name!r} is registered twice ({found[ep.name].value} and {ep.value}); "
                "uninstall one of the packages that declare it"
            )
        found[ep.name] = ep
    return found


def get_source_class(name: str) -> type[Source]:
    """The plugin class registered under `name`."""
    sources = available_sources()
    if name not in sources:
        valid = ", ".join(sorted(sources)) or "none (is vaepipe installed? run `pip install -e .`)"
        raise SourceError(f"unknown source {name!r}; valid sources: {valid}")
    cls = sources[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise SourceError(f"entry point {name!r} ({sources[name].value}) is not a pipeline.sources.Source")
    return cls


def validate_options(name: str, options: dict[str, Any], complete: bool = True) -> SourceConfig | None:
    """Validate `options` against the plugin's config, naming the bad field and the source.

    complete=False checks only what is given: unknown fields and bad values still fail, but a required field
    left out (an imagefolder `root`) is accepted and None returned. A training run reads the shard directory,
    not the source, so its config need not carry the source's options; the ingest validates them completely.
    """
    cls = get_source_class(name)
    try:
        return cls.Config(**options)
    except ValidationError as err:
        errors = [e for e in err.errors() if complete or e["type"] != "missing"]
        if not errors:
            return None
        problems = "; ".join(
            f"source.options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors
        )
        fields = ", ".join(cls.Config.model_fields) or "none"
        raise SourceError(f"invalid options for source {name!r}: {problems} (its fields: {fields})") from None


def build_source(name: str, options: dict[str, Any] | None = None, max_pixels: int | None = None) -> Source:
    """Instantiate the source `name` with validated `options`; `max_pixels`: the largest image it decodes
    (ingest.max_pixels; None: Pillow's limit)."""
    source = get_source_class(name)(validate_options(name, options or {}))
    if max_pixels is not None:
        source.max_pixels = max_pixels
    return source
