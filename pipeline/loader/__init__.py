"""Per-rank loader over a shard directory: every rank gets the same number of batches per epoch.

Each epoch the order is a pure function of (seed, epoch, rank), so a saved position resumes exactly, whatever
the number of worker processes.

Streaming (`streamed.py`): the shard order is permuted with a seed shared by all ranks, the shards are laid end
to end as one global sample stream, and rank r reads the contiguous slice [r * n, (r + 1) * n) with
n = ceil(N / world), wrapping to the start for the last few (as torch's DistributedSampler pads). So the ranks
read disjoint data that together cover the split, their batch counts are equal whatever the shard sizes (plain
`split_by_node` on uneven shards makes ranks disagree on step counts and DDP hangs), and a rank opens only the
shards that overlap its slice. Within a rank, windows of whole batches (`shuffle_buffer` samples, rounded up)
are permuted and each batch gathered from its window by index.

Resident (`resident.py`, the split fits `memory_budget`): the split is decoded once into a uint8 tensor on the
device, and each epoch a permutation shared by all ranks is cut into the same per-rank slices.

Corrupt shards (a garbled or truncated tar member, a sha256 mismatch under `verify`, an undecodable block or
image) follow `on_corrupt`: 'fail' raises `CorruptShardError` naming the shard and the fix; 'skip' logs a
warning, records the shard in `skipped_shards` and reads on. A shard's table (tar and array headers) is checked
before any of its samples is used, so a skipped shard contributes nothing, and the rank pads its slice by
reading on past its end (samples of other slices, wrapping to the start): training repeats a few samples
instead of losing a step on one rank, which would hang DDP. An image that fails to decode in a worker is
replaced by another image of its batch. Evaluation (pad=False) does not pad.

The loader never goes through `accelerator.prepare()`: that would make rank 0 read every batch and scatter it.

Which loader a split gets is `open_loader`'s choice (`factory.py`): resident when `resident` is 'on', or 'auto'
and the split fits `memory_budget`; `ShardLoader` is the type both share.

Latent directories (`pipeline.latents`, written by `vaepipe encode`) get a `LatentLoader` (`latents.py`): the same
`ShardLoader` plan (rank slices, seeded shuffle, resume, corrupt shards), reading each sample's arrays by offset
in this process (no decode), resident or streamed, and yielding `LatentBatch`es (mean, std, the mirrored twin,
labels, captions, keys) in index.json's dtype.

This package owns reading shard directories for training and evaluation. It imports the shard formats
(`pipeline.shards`, `pipeline.layouts`, `pipeline.latents`), `pipeline.augment` and storage; never the ingest
(`pipeline.ingestion`), the sources, `pipeline.settings`, `vae` or `flows`. Inside it, imports point one way:
`factory` imports `resident`, `streamed` and `latents`, they import `base` (the first two also `read`), and those
the leaf `corrupt`; `base` knows none of its subclasses.
"""

from pipeline.loader.base import Batch, ShardLoader
from pipeline.loader.corrupt import CORRUPTION, CorruptShardError, OnCorrupt
from pipeline.loader.factory import Resident, open_loader, read_captions, read_split
from pipeline.loader.latents import LatentBatch, LatentLoader
from pipeline.loader.resident import ResidentLoader
from pipeline.loader.streamed import StreamedLoader

__all__ = ["CORRUPTION", "Batch", "CorruptShardError", "LatentBatch", "LatentLoader", "OnCorrupt", "Resident",
           "ResidentLoader", "ShardLoader", "StreamedLoader", "open_loader", "read_captions", "read_split"]
