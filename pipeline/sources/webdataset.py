"""`webdataset`: existing WebDataset tar shards, by default in the layout img2dataset writes.

    shards/00000.tar          000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    shards/00000_stats.json   {"count": 10000, "successes": 9412, ...}
    shards/00000.parquet      every input row with its download status (not read here)

`urls` names the shards: a directory (its `*.tar`, sorted), a brace pattern (`shards/{00000..00127}.tar`,
expanded by webdataset), a glob, a list of these, or a dict of split name -> these; a string or list is the
split `train`. Local paths and fsspec URLs (`s3://bucket/shards/{00000..00127}.tar`, with `storage_options`)
are opened through fsspec; `pipe:` URLs through webdataset's `gopen` (they run a shell command, as in
webdataset). Tar members become samples with webdataset's own tar iterator and key grouping.

A sample's image is its first member among `image_keys`; its key is the sample's `__key__` (img2dataset's
running id) and its caption the UTF-8 text of its `caption_key` member (`txt`); both are stored in the shards.
A split's samples have a caption each or none (a sample without the member has none). The image bytes are kept
as they are when they decode with no conversion (as imagefolder does). A member that does not decode is a
`Rejected` naming the shard; a tar that ends inside a member is a `SourceError` naming the file.

Counts: when every shard of a split has img2dataset's `{name}_stats.json` beside it, its `successes` (the
samples img2dataset wrote into that tar) give the split's size, so the ingest plans parallel shard groups and
a group opens only the shards its range touches; a shard whose samples differ from its stats is an error.
Without them the split's size is unknown, and the ingest reads it with one task per input tar (`parts`), each
writing its own shards.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field, field_validator
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.conform import BadImage, decode_source
from pipeline.errors import SourceError
from pipeline.records import Record, Rejected
from pipeline.sources import Source, SourceConfig

Urls = str | list[str]
STATS_SUFFIX = "_stats.json"  # img2dataset writes {shard}_stats.json beside {shard}.tar
# storage option names that carry credentials: the source's config is stored in index.json, so these must come
# from the environment or a profile instead
_SECRETS = {"key", "secret", "token", "password", "access_key", "secret_key", "session_token",
            "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
log = logging.getLogger(__name__)


class WebDatasetConfig(SourceConfig):
    urls: Urls | dict[str, Urls] = Field(
        description="Shards: a directory, brace pattern (shards/{00000..00127}.tar), glob, or fsspec URL, or a list "
        "of them (the split 'train'); or split name -> those."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the URLs, e.g. {endpoint_url: http://minio:9000}; "
        "no credentials (they would be stored in index.json): use the environment or a profile."
    )
    image_keys: tuple[str, ...] = Field(
        ("jpg", "jpeg", "png", "webp"), min_length=1, description="Member suffixes tried in order for a sample's image."
    )
    label_key: str | None = Field(None, description="Member suffix holding a class index (webdataset's 'cls').")
    caption_key: str | None = Field(
        "txt", description="Member suffix holding the caption (img2dataset's 'txt'), stored with the image and its "
        "key; null: store no captions."
    )
    use_stats: bool = Field(
        True, description="Take each shard's sample count from img2dataset's {shard}_stats.json (parallel groups "
        "of ingest.shards_per_task shards; without: one ingest task per input tar)."
    )

    @field_validator("urls")
    @classmethod
    def _some_urls(cls, urls: Urls | dict[str, Urls]) -> Urls | dict[str, Urls]:
        lists = urls.values() if isinstance(urls, dict) else [urls]
        if not urls or any(not u for u in lists):
            raise ValueError("names no shards; give a directory, a pattern such as shards/{00000..00127}.tar, or a "
                             "list of them")
        return urls

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        found = _credential_names(options)
        if found:
            raise ValueError(
                f"{', '.join(found)} would be written into index.json with the source's config; give credentials "
                "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a profile ({profile: name})"
            )
        return options


def _credential_names(options: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for name, value in options.items():
        if name.lower() in _SECRETS:
            found.append(prefix + name)
        elif isinstance(value, dict):
            found += _credential_names(value, f"{prefix}{name}.")
    return found


@dataclass(frozen=True)
class Shard:
    """One input tar: where it is, and its sample count when img2dataset's stats give it."""

    url: str  # as people read it: a local path, an s3:// URL, a pipe: command
    fs: fsspec.AbstractFileSystem | None  # None: a pipe: URL, opened by webdataset's gopen
    path: str
    count: int | None

    def open(self):
        return wds.gopen(self.url) if self.fs is None else self.fs.open(self.path, "rb")


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


class _Listings:
    """Directory listings, each made once per resolution (one LIST on an object store, not one HEAD per shard or
    stats file)."""

    def __init__(self) -> None:
        self.dirs: dict[tuple[fsspec.AbstractFileSystem, str], dict[str, dict[str, Any]] | None] = {}

    def __call__(self, fs: fsspec.AbstractFileSystem, directory: str) -> dict[str, dict[str, Any]] | None:
        """Path -> fsspec's info (type, size, mtime or ETag) for the entries of `directory`; None when it does
        not exist."""
        if (fs, directory) not in self.dirs:
            try:
                entries = {e["name"].rstrip("/"): e for e in fs.ls(directory, detail=True)}
            except (FileNotFoundError, NotADirectoryError):
                entries = None
            self.dirs[fs, directory] = entries
        return self.dirs[fs, directory]


def _tars(entries: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(p for p, e in entries.items() if e["type"] == "file" and p.endswith(".tar"))


def _expand(spec: str, storage_options: dict[str, Any], listing: _Listings) -> list[Shard]:
    """The shards one `urls` entry names, in order, each checked to exist."""
    found: list[Shard] = []
    for url in expand_urls(spec):  # webdataset's expansion: '::' lists, WDS_ variables, {a..b} braces
        if url.startswith("pipe:"):
            found.append(Shard(url, None, url, None))
            continue
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        if fsspec.core.has_magic(path):
            paths = sorted(fs.glob(path))
        else:
            entries = listing(fs, posixpath.dirname(path))
            info = None if entries is None else entries.get(path.rstrip("/"))
            if info is None:
                raise _missing(spec, url, fs, path, entries)
            paths = _tars(listing(fs, path) or {}) if info["type"] == "directory" else [path]
        if not paths:
            raise SourceError(f"webdataset source: no .tar file matches {url!r} (from {spec!r}); check "
                              "source.options.urls")
        found += [Shard(_display(fs, p), fs, p, None) for p in paths]
    return found


def _missing(spec: str, url: str, fs, path: str, entries: dict[str, dict[str, Any]] | None) -> SourceError:
    directory = _display(fs, posixpath.dirname(path))
    if entries is None:
        return SourceError(f"webdataset source: {url} names a directory {directory} that does not exist (from "
                           f"source.options.urls {spec!r})")
    tars = [posixpath.basename(p) for p in _tars(entries)]
    holds = f"{len(tars)} .tar files ({tars[0]} .. {tars[-1]})" if tars else "no .tar files"
    return SourceError(f"webdataset source: {url} does not exist; {directory} holds {holds}. Fix source.options.urls "
                       f"({spec!r})")


def _stats_path(path: str) -> str | None:
    return path[: -len(".tar")] + STATS_SUFFIX if path.endswith(".tar") else None


def _counted(split: str, shards: list[Shard], listing: _Listings) -> list[Shard]:
    """The shards with their img2dataset counts, when every one has a stats file; else as they are."""
    stats = [_stats_path(s.path) if s.fs is not None else None for s in shards]
    infos = [None if p is None else (listing(s.fs, posixpath.dirname(p)) or {}).get(p)
             for s, p in zip(shards, stats, strict=True)]
    if None in infos:
        log.info("webdataset: %d of %d shards of split %r have no img2dataset %s beside them (e.g. %s), so its size "
                 "is unknown and the ingest reads it with one task per shard", infos.count(None), len(shards), split,
                 STATS_SUFFIX, shards[infos.index(None)].url)
        return shards
    keys = [(s.fs, p, _version(info)) for s, p, info in zip(shards, stats, infos, strict=True)]
    unread: dict[fsspec.AbstractFileSystem, dict[str, str]] = {}  # fs -> {path: version}
    for fs, path, version in keys:
        if (fs, path, version) not in _COUNTS:
            unread.setdefault(fs, {})[path] = version
    for fs, versions in unread.items():
        texts = fs.cat(list(versions))  # {path: bytes}; concurrent GETs on an object store
        for path, version in versions.items():
            _COUNTS[fs, path, version] = _successes(_display(fs, path), texts[path])
    return [Shard(s.url, s.fs, s.path, _COUNTS[key]) for s, key in zip(shards, keys, strict=True)]


# (filesystem, stats path, its size and modification) -> successes: each group of an ingest resolves the shards
# again (a fresh listing, so added or replaced files are seen), but reads a stats file only once while it is unchanged
_COUNTS: dict[tuple[fsspec.AbstractFileSystem, str, str], int] = {}


def _version(info: dict[str, Any]) -> str:
    """What changes when a file is replaced: its size and, as the filesystem gives it, mtime or ETag."""
    return repr([info.get(k) for k in ("size", "mtime", "LastModified", "ETag")])


def _successes(name: str, text: bytes) -> int:
    try:
        count = json.loads(text)["successes"]
    except (ValueError, KeyError, TypeError) as err:
        raise SourceError(
            f"webdataset source: {name} is not an img2dataset stats file with a 'successes' count "
            f"({type(err).__name__}: {err}); fix or remove it, or set source.options.use_stats=false"
        ) from None
    if not isinstance(count, int) or count < 0:
        raise SourceError(f"webdataset source: {name} gives 'successes': {count!r}, not a count; fix or remove it, "
                          "or set source.options.use_stats=false")
    return count


def _resolve(config: WebDatasetConfig) -> dict[str, tuple[Shard, ...]]:
    """Split -> its shards, each checked to exist, with their counts when the stats give them."""
    urls, storage_options = config.urls, config.storage_options
    specs = urls if isinstance(urls, dict) else {"train": urls}
    splits, seen, listing = {}, {}, _Listings()
    for split, spec in specs.items():
        entries = [spec] if isinstance(spec, str) else spec
        shards = [s for entry in entries for s in _expand(entry, storage_options, listing)]
        for shard in shards:
            if shard.url in seen:
                first = seen[shard.url]
                where = f"in split {split!r}" if first == split else f"in splits {first!r} and {split!r}"
                raise SourceError(f"webdataset source: {shard.url} is named twice ({where}); each shard may feed one "
                                  "split once. Fix source.options.urls")
            seen[shard.url] = split
        splits[split] = tuple(_counted(split, shards, listing) if config.use_stats else shards)
    return splits


class WebDatasetSource(Source):
    name = "webdataset"
    Config = WebDatasetConfig

    @functools.cached_property
    def _shards(self) -> dict[str, tuple[Shard, ...]]:
        """Listed once per source object: the ingest builds one to plan and one per shard group."""
        return _resolve(self.config)

    def splits(self) -> list[str]:
        return list(self._shards)

    def num_records(self, split: str) -> int | None:
        self._check_split(split)
        counts = [s.count for s in self._shards[split]]
        return None if None in counts else sum(counts)

    def parts(self, split: str) -> list[str]:
        """The split's shards, each a part: an uncounted split is ingested by one task per input tar."""
        self._check_split(split)
        return [shard.url for shard in self._shards[split]]

    def part_records(self, split: str, part: str) -> Iterator[Record | Rejected]:
        """The samples of the split's shard `part` (its url, as `parts` names it)."""
        self._check_split(split)
        shards = [shard for shard in self._shards[split] if shard.url == part]
        if not shards:
            raise SourceError(f"webdataset source: split {split!r} has no shard {part}; its shards changed since the "
                              "ingest was planned? Run the ingest again")
        return self._read(shards, 0, None)

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record | Rejected]:
        """The samples [start, stop) of the split, shard after shard. With counts, shards wholly before `start` are
        not opened, and a shard the range reaches the end of is read to its end, so that its count is checked."""
        self._check_split(split)
        return self._read(self._shards[split], start, stop)

    def _read(self, shards: Sequence[Shard], start: int, stop: int | None) -> Iterator[Record | Rejected]:
        index = 0  # the number, among these shards, of the next sample
        for shard in shards:
            if stop is not None and index >= stop:
                return
            if shard.count is not None and index + shard.count <= start:
                index += shard.count
                continue
            end = None if shard.count is None else index + shard.count
            for sample in _samples(shard):
                if index >= start and (stop is None or index < stop):
                    yield self._record(sample, shard)
                index += 1
                if stop is not None and index >= stop and (end is None or index < end):
                    break  # the range ends inside this shard: the rest of it is another group's

    def _record(self, sample: dict[str, Any], shard: Shard) -> Record | Rejected:
        key = sample["__key__"]
        members = sorted(k for k in sample if not k.startswith("__"))
        image_key = next((k for k in self.config.image_keys if k in sample), None)
        if image_key is None:
            return Rejected(key, "missing", f"in {shard.url}: no image member ({', '.join(self.config.image_keys)}); "
                                            f"it has {members}. Set source.options.image_keys")
        data = sample[image_key]
        try:
            image, kept_as = decode_source(data, self.max_pixels)
        except BadImage as err:
            return Rejected(key, err.kind, f"in {shard.url}: {key}.{image_key}: {err}")
        label = None
        if self.config.label_key is not None:
            try:
                label = int(sample[self.config.label_key])
            except (KeyError, ValueError) as err:
                return Rejected(key, "label", f"in {shard.url}: no integer class in member .{self.config.label_key} "
                                              f"({type(err).__name__}: {err}); it has {members}")
        text = None
        if self.config.caption_key is not None and self.config.caption_key in sample:
            try:
                text = sample[self.config.caption_key].decode()
            except UnicodeDecodeError as err:
                return Rejected(key, "caption", f"in {shard.url}: {key}.{self.config.caption_key} is not UTF-8 text "
                                                f"({err}); set source.options.caption_key null to store no captions")
        return Record(key=key, image=image, label=label, encoded=data if kept_as else None, encoded_format=kept_as,
                      text=text)


def _samples(shard: Shard) -> Iterator[dict[str, Any]]:
    """The shard's samples through webdataset's tar iterator and key grouping; a truncated tar, or a count that
    differs from the shard's stats, is a SourceError naming the file."""
    n = 0
    stream = shard.open()
    try:
        for sample in group_by_keys(tar_file_expander([{"url": shard.url, "stream": stream}])):
            n += 1
            if shard.count is not None and n > shard.count:
                raise _count_error(shard, "more than", "stats from another run?")
            yield sample
    except (tarfile.TarError, EOFError) as err:
        reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__  # webdataset appends " @ stream"
        raise SourceError(
            f"webdataset source: {shard.url} is truncated or corrupt after {n} sample(s) ({reason}); download it "
            "again, or leave it out of source.options.urls"
        ) from None
    finally:
        stream.close()
    if shard.count is not None and n != shard.count:
        raise _count_error(shard, f"only {n}, fewer than", "a tar cut between two members reads as complete")


def _count_error(shard: Shard, how: str, cause: str) -> SourceError:
    return SourceError(
        f"webdataset source: {shard.url} holds {how} the {shard.count} samples its {STATS_SUFFIX} gives ({cause}); "
        "download it again, or set source.options.use_stats=false to ignore the stats (the split is then read "
        "by one task per shard)"
    )
