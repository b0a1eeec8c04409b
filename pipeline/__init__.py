"""Data side of vaepipe: source plugins, the version-1 shard format, and the per-rank loader.

This module is the public API that `vae` and `flows` import; the submodules are internal.
"""

from pipeline.errors import ShardFormatError, SourceError
from pipeline.ingest import finalize_ingest, ingest, ingest_split, is_complete, prepare_dir
from pipeline.loader import Batch, ShardLoader, read_split
from pipeline.records import Record
from pipeline.shards import INDEX_NAME, ShardIndex, read_index
from pipeline.sources import available_sources, build_source, get_source_class

__all__ = [
    "INDEX_NAME",
    "Batch",
    "Record",
    "ShardFormatError",
    "ShardIndex",
    "ShardLoader",
    "SourceError",
    "available_sources",
    "build_source",
    "get_source_class",
    "finalize_ingest",
    "ingest",
    "ingest_split",
    "is_complete",
    "prepare_dir",
    "read_index",
    "read_split",
]
