"""Data side of vaepipe. Owns the source plugins, the ingest and its settings, the version-1 shard format, and the
per-rank loader.

This module is the public API that `vae` and `flows` import; the submodules are internal. The packages:
`sources` (plugins that read inputs as records), `ingest` (records -> a shard directory, step by step) and
`loader` (a shard directory -> batches for one rank); `settings` is the schema of the source and ingest sections.
Between them lie the shard format (`shards`, `layouts`, `npy`), image conforming (`conform`, `augment`), storage
(`storage`, `lock`, `ownership`) and `errors`. Nothing in pipeline imports `vae` or `flows`, the ingest and the
loader never import each other, and no two modules import each other.
"""

from pipeline.errors import ShardFormatError, SourceError
from pipeline.ingest import (
    GroupResult,
    GroupTask,
    IngestPlan,
    finalize_ingest,
    ingest,
    is_complete,
    plan_ingest,
    prepare_dir,
    write_group,
)
from pipeline.loader import Batch, ShardLoader, open_loader, read_captions, read_split
from pipeline.lock import DirectoryLockedError, DirLock
from pipeline.preflight import check_ingest
from pipeline.records import Record, Rejected
from pipeline.settings import SHARD_FIELDS, IngestSection, SourceSection
from pipeline.shards import INDEX_NAME, REPORT_NAME, ShardIndex, index_sha256, read_index, verify
from pipeline.sources import available_sources, build_source, get_source_class
from pipeline.storage import DestinationError, is_url

__all__ = [
    "INDEX_NAME",
    "SHARD_FIELDS",
    "REPORT_NAME",
    "Batch",
    "DestinationError",
    "DirLock",
    "DirectoryLockedError",
    "GroupResult",
    "GroupTask",
    "IngestPlan",
    "IngestSection",
    "Record",
    "Rejected",
    "ShardFormatError",
    "ShardIndex",
    "ShardLoader",
    "SourceError",
    "SourceSection",
    "available_sources",
    "build_source",
    "check_ingest",
    "get_source_class",
    "finalize_ingest",
    "index_sha256",
    "ingest",
    "is_url",
    "is_complete",
    "open_loader",
    "plan_ingest",
    "prepare_dir",
    "read_captions",
    "read_index",
    "read_split",
    "verify",
    "write_group",
]
