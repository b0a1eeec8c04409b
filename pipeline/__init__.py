"""Data side of vaepipe. Owns the source plugins, the ingest and its settings, the version-1 shard formats (images,
and the latents `vaepipe encode` writes), and the per-rank loader.

This module is the public API that `vae` and `flows` import; the submodules are internal but for `latents`, the
latent format that `vae.latents` writes with. The packages: `sources` (plugins that read inputs as records),
`ingestion` (records -> a shard directory, step by step) and `loader` (a shard directory -> batches for one rank,
images or latents); `settings` is the schema of the source and ingest sections. Between them lie the shard formats
(`shards`, `layouts`, `npy`, `latents`), image conforming (`conform`, `augment`), storage (`storage`, `lock`,
`ownership`) and `errors`. Nothing in pipeline imports `vae` or `flows`, the ingest and the loader never import each
other, and no two modules import each other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import ShardFormatError, SourceError
from pipeline.settings import SHARD_FIELDS, IngestSection, SourceSection
from pipeline.storage import DestinationError, is_url

# The rest of the face is loaded on first use (PEP 562): the ingest, the shard format and the loader import torch,
# numpy's heavier parts, Pillow and webdataset (~2 s), which the settings, read by the run config and
# `vaepipe --help`, never need.
_LAZY = {
    **dict.fromkeys(("GroupResult", "GroupTask", "IngestPlan", "finalize_ingest", "ingest", "is_complete",
                     "plan_ingest", "prepare_dir", "write_group"), "pipeline.ingestion"),
    **dict.fromkeys(("Batch", "LatentBatch", "LatentLoader", "ShardLoader", "open_loader", "read_captions",
                     "read_split"), "pipeline.loader"),
    "LatentIndex": "pipeline.latents",
    **dict.fromkeys(("DirectoryLockedError", "DirLock"), "pipeline.lock"),
    "check_ingest": "pipeline.preflight",
    **dict.fromkeys(("Record", "Rejected"), "pipeline.records"),
    **dict.fromkeys(("INDEX_NAME", "REPORT_NAME", "ShardIndex", "index_sha256", "read_index", "verify"),
                    "pipeline.shards"),
    **dict.fromkeys(("available_sources", "build_source", "get_source_class"), "pipeline.sources"),
}

if TYPE_CHECKING:
    from pipeline.ingestion import (  # noqa: F401
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
    from pipeline.latents import LatentIndex  # noqa: F401
    from pipeline.loader import (  # noqa: F401
        Batch,
        LatentBatch,
        LatentLoader,
        ShardLoader,
        open_loader,
        read_captions,
        read_split,
    )
    from pipeline.lock import DirectoryLockedError, DirLock  # noqa: F401
    from pipeline.preflight import check_ingest  # noqa: F401
    from pipeline.records import Record, Rejected  # noqa: F401
    from pipeline.shards import INDEX_NAME, REPORT_NAME, ShardIndex, index_sha256, read_index, verify  # noqa: F401
    from pipeline.sources import available_sources, build_source, get_source_class  # noqa: F401


# By hand (six lines, PEP 562), the same idiom as vae.models' face; pipeline may not import vae to share it.
def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


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
    "LatentBatch",
    "LatentIndex",
    "LatentLoader",
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
