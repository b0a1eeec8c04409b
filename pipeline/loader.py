"""Per-rank loader over a shard directory: every rank gets the same number of batches per epoch.

Each epoch the order is a pure function of (seed, epoch, rank), so a saved position resumes exactly.

Streaming mode: the shard order is permuted with a seed shared by all ranks, the shards are laid end to end
as one global sample stream, and rank r reads the contiguous slice [r * n, (r + 1) * n) with
n = ceil(N / world), wrapping to the start for the last few (as torch's DistributedSampler pads). So the
ranks read disjoint data that together cover the split, their batch counts are equal whatever the shard
sizes (plain `split_by_node` on uneven shards makes ranks disagree on step counts and DDP hangs), and a rank
opens only the shards that overlap its slice. Within a rank, a window of `shuffle_buffer` samples is
permuted and each batch gathered from it by index: one batch-sized copy, no permuted copy of the window.

Resident mode (the split fits `memory_budget`): the split is decoded once into a uint8 tensor on the
device, and each epoch a permutation shared by all ranks is cut into the same per-rank slices as above:
disjoint, equal in count, and on a GPU no host work per batch at all.

Corrupt shards (a garbled or truncated tar member, a sha256 mismatch under `verify`, an undecodable block or
image) follow `on_corrupt`: 'fail' raises `CorruptShardError` naming the shard and the fix; 'skip' logs a
warning, records the shard in `skipped_shards` and reads on. A rank finds a corrupt shard only when it reads
it, and the ranks never talk, so skipping must not change any rank's batch count: the shard keeps its place
in the stream (every rank plans the same stream), and the rank pads its slice by reading on past its end, as
the padding of the last slice does (samples of other slices, wrapping to the start). Training thus repeats a
few samples instead of losing a step on one rank, which would hang DDP. Evaluation (pad=False) does not pad.
In resident mode every rank reads the whole split, so all of them skip the same shards. A packed shard's tar
and array headers are checked before any of its samples is used, so a skipped packed shard contributes
nothing; an encoded shard that fails part-way keeps the images read before the failure.

The loader never goes through `accelerator.prepare()`: that would make rank 0 read every batch and scatter it.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.errors import ShardFormatError
from pipeline.shards import Chunk, PackedBlock, check_shard, packed_blocks, read_chunks, read_index
from pipeline.storage import Location

Resident = Literal["auto", "on", "off"]
OnCorrupt = Literal["fail", "skip"]
# What reading a damaged shard raises: our own format checks, tarfile, numpy's .npy header parser (ValueError),
# image decoders (OSError, ValueError), a truncated stream (EOFError), and storage errors (OSError).
CORRUPTION = (ShardFormatError, tarfile.TarError, ValueError, OSError, EOFError)
log = logging.getLogger(__name__)


class CorruptShardError(ShardFormatError):
    """A shard could not be read, and the policy is to stop; the message names the shard and the fix."""


@dataclass(frozen=True, slots=True)
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W), contiguous
    labels: torch.Tensor | None  # int64 (B,)
    factors: torch.Tensor | None = None  # float32 (B, K): ground-truth factors, when the source has them


def _slice_ranges(start: int, stop: int, total: int) -> list[tuple[int, int]]:
    """[start, stop) in a stream of `total` samples that wraps around, as non-wrapping ranges."""
    ranges = []
    while start < stop:
        lo = start % total
        hi = min(total, lo + (stop - start))
        ranges.append((lo, hi))
        start += hi - lo
    return ranges


def _generator(*seed: int) -> torch.Generator:
    """A CPU torch generator seeded from a tuple, as numpy's default_rng(list) is."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(seed)).integers(1 << 62)))


def _concat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    return None if parts[0] is None else (parts[0] if len(parts) == 1 else np.concatenate(parts))


class ShardLoader:
    """Iterates one split of a shard directory for one rank, yielding `Batch`es.

    pad=True (training): every rank reads ceil(N / world) samples, so batch counts are equal.
    pad=False (evaluation): rank r reads exactly [r * N // world, (r + 1) * N // world); counts may differ by
    one batch, which is fine when evaluation runs no collective per batch.
    resident: 'auto' keeps the split on `device` when its decoded size fits `memory_budget` bytes.
    verify: check each shard's sha256 against index.json before its first read (reads every shard twice).
    on_corrupt: 'fail' raises CorruptShardError at an unreadable shard; 'skip' warns, records it in
    `skipped_shards` (name -> why) and reads on, padding the slice so the batch count does not change.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = True,
        shuffle_buffer: int = 65536,
        resident: Resident = "off",
        memory_budget: int = 2 << 30,
        device: torch.device | str | None = None,
        verify: bool = False,
        storage_options: dict | None = None,
        on_corrupt: OnCorrupt = "fail",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.location = Location(shard_dir, storage_options)
        self.shard_dir = shard_dir
        self.index = read_index(self.location)
        info = self.index.split(split)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.pad = seed, shuffle, drop_last, pad
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.names = [s.name for s in info.shards]
        self.infos = info.shards
        self.counts = np.array([s.num_samples for s in info.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.has_labels = info.num_classes is not None
        self.has_factors = info.num_factors is not None
        self.verify = verify
        self._verified: set[str] = set()
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.skipped_shards: dict[str, str] = {}  # shard name -> why it was skipped (on_corrupt='skip')
        self.nbytes = self.num_samples * int(np.prod(self.index.image_shape))
        if resident not in ("auto", "on", "off"):
            raise ValueError(f"resident must be 'auto', 'on' or 'off', got {resident!r}")
        self.resident = resident == "on" or (resident == "auto" and self.nbytes <= memory_budget)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._data: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        if pad:
            per_rank = math.ceil(self.num_samples / world_size)
            self.start, self.stop = rank * per_rank, (rank + 1) * per_rank
        else:
            self.start = rank * self.num_samples // world_size
            self.stop = (rank + 1) * self.num_samples // world_size
        if drop_last and self.stop - self.start < batch_size:
            raise ShardFormatError(
                f"split {split!r} has {self.num_samples} samples: fewer than one batch of {batch_size} for each of "
                f"{world_size} rank(s); lower the batch size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self._skip = 0  # batches to pass over at the next iteration (a resumed mid-epoch position)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle to use (call before iterating, on every rank).

        Setting the epoch a restored position belongs to keeps that position; any other epoch starts at 0.
        """
        if epoch != self.epoch:
            self._skip = self.position = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where this rank stands: the epoch and how many of its batches were consumed."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at `state`: the next iteration yields that epoch's batches from `position` on, so a resumed
        run neither repeats nor skips a sample (the order is a pure function of seed, epoch and rank)."""
        self.epoch, self._skip = int(state["epoch"]), int(state["position"])
        self.position = self._skip

    @property
    def samples_per_rank(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        n = self.samples_per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        skip, self._skip = self._skip, 0
        self.position = skip
        plans = self._resident_batches() if self.resident else self._streamed_batches()
        for index, make in enumerate(plans):
            if index >= skip:  # a resumed position skips batches without gathering them
                self.position = index + 1  # counted when handed out: a checkpoint taken now must not repeat it
                yield make()

    # ---- streaming

    def _shard_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.names))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.names))

    def _segments(self, start: int | None = None, stop: int | None = None) -> list[tuple[int, int, int]]:
        """(shard index, first, last) local sample ranges of the stream range [start, stop) (default: this rank's
        slice) this epoch, in stream order; the range may run past the end of the stream and wrap."""
        start, stop = (self.start, self.stop) if start is None else (start, stop)
        order = self._shard_order()
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])  # global offset of each shard in the stream
        segments = []
        for lo, hi in _slice_ranges(start, stop, self.num_samples):
            for pos in range(len(order)):
                a, b = max(lo, starts[pos]), min(hi, starts[pos + 1])
                if a < b:
                    segments.append((int(order[pos]), int(a - starts[pos]), int(b - starts[pos])))
        return segments

    def _check_sum(self, shard: int) -> None:
        """With verify on: the shard's sha256 against index.json, once per shard."""
        name = self.names[shard]
        if self.verify and name not in self._verified:
            problem = check_shard(self.location, self.infos[shard])
            if problem:
                raise ShardFormatError(f"does not match index.json ({problem})")
            self._verified.add(name)

    def _read(self, shard: int) -> Iterator[Chunk]:
        self._check_sum(shard)
        return read_chunks(self.location, self.names[shard], self.index)

    def _corrupt(self, shard: int, err: Exception) -> None:
        """Apply the on_corrupt policy to a shard that failed to read: raise, or warn and record it."""
        name, path = self.names[shard], self.location.display(self.names[shard])
        # our own checks say what is wrong as a predicate ("holds 8 samples but ..."); anything else is quoted
        reason = str(err) if type(err) is ShardFormatError else f"could not be read ({type(err).__name__}: {err})"
        if self.on_corrupt == "fail":
            raise CorruptShardError(
                f"{path} {reason}: the shard is corrupt. Check the directory with `vaepipe verify {self.location}` "
                "and re-run the ingest (intact shard groups are kept), or set data.on_corrupt_shard skip to train "
                "without the shard"
            ) from err
        self.skipped_shards[name] = reason
        log.warning("skipping corrupt shard %s: it %s (data.on_corrupt_shard is 'skip'); repair with `vaepipe "
                    "verify %s` and a re-run of the ingest", path, reason, self.location)

    def _take(self, shard: int, first: int, last: int, blocks_of) -> Iterator[tuple[object, slice]]:
        """(block, slice) for samples [first, last) of `shard`, walking it block by block (`blocks_of(shard)`
        yields (block, samples in it)); returns how many of them could not be read (a corrupt shard, skipped).
        A shard shorter than index.json says is corrupt, never a silently short epoch."""
        if self.names[shard] in self.skipped_shards:  # known bad: not opened again, not reported again
            return last - first
        offset = delivered = 0
        try:
            for block, n in blocks_of(shard):
                a, b = max(first, offset), min(last, offset + n)
                if a < b:
                    delivered += b - a
                    yield block, slice(a - offset, b - offset)
                offset += n
                if offset >= last:
                    break
            if offset < last:
                raise ShardFormatError(
                    f"holds {offset} samples but index.json says at least {last} (truncated or replaced)"
                )
        except CORRUPTION as err:
            self._corrupt(shard, err)
            return last - first - delivered
        return 0

    def _overlaps(self, blocks_of, segments: list[tuple[int, int, int]] | None = None) -> Iterator[tuple]:
        """(block, slice) for each part of a block inside `segments` (default: this rank's slice, padded).

        Samples of skipped shards are made up, when padding, from the stream past the slice's end (wrapping),
        so the rank's sample count, and with it its batch count, stays what every other rank expects."""
        missing = 0
        for shard, first, last in self._segments() if segments is None else segments:
            missing += yield from self._take(shard, first, last, blocks_of)
        cursor = self.stop
        while missing and self.pad and segments is None:
            if cursor - self.stop >= self.num_samples:
                raise ShardFormatError(
                    f"{self.location}: no readable shard is left in split {self.split!r} (skipped: "
                    f"{sorted(self.skipped_shards)}); re-run the ingest"
                )
            want, missing = missing, 0
            for shard, first, last in self._segments(cursor, cursor + want):
                missing += yield from self._take(shard, first, last, blocks_of)
            cursor += want

    def _chunks(self, segments: list[tuple[int, int, int]] | None = None) -> Iterator[Chunk]:
        """The rank's samples as array chunks, block by block (views into the shard bytes, not copies); given
        `segments`, exactly those (a skipped shard's part is left out, not padded)."""
        def chunks_of(shard: int):
            if self.index.layout == "packed":
                self._packed_index(shard)  # the headers are checked before any of the shard's samples is used
            return ((self._with_extras(chunk), len(chunk.images)) for chunk in self._read(shard))

        for chunk, sl in self._overlaps(chunks_of, segments):
            yield Chunk(
                chunk.images[sl],
                chunk.labels[sl] if self.has_labels else None,
                chunk.factors[sl] if self.has_factors else None,
            )

    def _packed_index(self, shard: int) -> list[PackedBlock]:
        """A packed shard's blocks from its tar and .npy headers (no pixels read), checked against index.json
        and the file size before any of its samples is used."""
        name = self.names[shard]
        self._check_sum(shard)
        sample_bytes = int(np.prod(self.index.image_shape))
        blocks, size = [], self.location.size(name)
        for block, _ in packed_blocks(self.location, name, self.index.image_shape):
            self._with_extras(block)
            if block.offset + block.num * sample_bytes > size:
                raise ShardFormatError(f"ends inside block {len(blocks)} at byte {size} (truncated)")
            blocks.append(block)
        held = sum(block.num for block in blocks)
        if held != self.counts[shard]:
            raise ShardFormatError(f"holds {held} samples but index.json says {self.counts[shard]}")
        return blocks

    def _with_extras(self, block):
        """`block` (a Chunk or PackedBlock), when it has the labels and factors that index.json promises."""
        for what, promised, value in (("labels", self.has_labels, block.labels),
                                      ("factors", self.has_factors, block.factors)):
            if promised and value is None:
                raise ShardFormatError(f"holds a block without {what}, but index.json says split {self.split!r} "
                                       f"has {what}")
        return block

    def _packed_pieces(self) -> Iterator[tuple[object, int, int, np.ndarray | None, np.ndarray | None]]:
        """(open shard file, byte offset, samples, labels, factors) for each piece of a block this rank reads."""
        sample_bytes = int(np.prod(self.index.image_shape))

        def blocks_of(shard: int):
            blocks = self._packed_index(shard)
            with self.location.open(self.names[shard]) as f:
                for block in blocks:
                    yield (block, f), block.num

        for (block, f), sl in self._overlaps(blocks_of):
            yield (f, block.offset + sl.start * sample_bytes, sl.stop - sl.start,
                   block.labels[sl] if self.has_labels else None,
                   block.factors[sl] if self.has_factors else None)

    def _packed_batches(self):
        """Packed shards: block pieces are read straight into one window buffer (`readinto`: the only copy before
        the batch gather), the window is permuted, and each batch gathered from it by index."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        capacity = self.shuffle_buffer + self.index.block_size + self.batch_size
        images = np.empty((capacity, *self.index.image_shape), np.uint8)
        flat = memoryview(images.reshape(-1))
        sample_bytes = int(np.prod(self.index.image_shape))
        labels: list[np.ndarray] = []
        factors: list[np.ndarray] = []
        pos = 0
        for f, offset, n, block_labels, block_factors in self._packed_pieces():
            f.seek(offset)
            if f.readinto(flat[pos * sample_bytes : (pos + n) * sample_bytes]) != n * sample_bytes:
                # each shard's size was checked before reading began: the file changed under the reader
                raise ShardFormatError(f"{self.location}: a shard shrank while it was read; is an ingest writing "
                                       "into this directory? Re-run the ingest")
            labels.append(block_labels)
            factors.append(block_factors)
            pos += n
            if pos >= self.shuffle_buffer:
                window = Chunk(images[:pos], _concat(labels), _concat(factors))
                rest = yield from self._window([window], rng, final=False)
                pos = len(rest.images)
                images[:pos] = rest.images  # fewer than one batch, carried to the front of the buffer
                labels, factors = [rest.labels], [rest.factors]
        if pos:
            yield from self._window([Chunk(images[:pos], _concat(labels), _concat(factors))], rng, final=True)

    def _streamed_batches(self):
        """Batch makers for this epoch: a window of chunks is merged, permuted, and gathered batch by batch."""
        if self.index.layout == "packed":
            yield from self._packed_batches()
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        pending: list[Chunk] = []
        buffered = 0
        for chunk in self._chunks():
            pending.append(chunk)
            buffered += len(chunk.images)
            if buffered >= self.shuffle_buffer:
                leftover = yield from self._window(pending, rng, final=False)
                pending, buffered = [leftover], len(leftover.images)
        if buffered:
            yield from self._window(pending, rng, final=True)

    def _window(self, chunks: list[Chunk], rng: np.random.Generator, final: bool):
        images = _concat([c.images for c in chunks])
        labels = _concat([c.labels for c in chunks])
        factors = _concat([c.factors for c in chunks])
        n = len(images)
        order = rng.permutation(n) if self.shuffle else np.arange(n)  # gathers copy: the buffer is reused
        usable = n - n % self.batch_size
        for i in range(0, usable, self.batch_size):
            yield self._maker(images, labels, factors, i, i + self.batch_size, order)
        if final:
            if usable < n and not self.drop_last:
                yield self._maker(images, labels, factors, usable, n, order)
            return None
        rest = order[usable:]  # carried into the next window
        return Chunk(images[rest], None if labels is None else labels[rest], None if factors is None else factors[rest])

    def _maker(self, images, labels, factors, lo: int, hi: int, order: np.ndarray):
        def make() -> Batch:
            idx = order[lo:hi]
            return self._batch(images[idx], None if labels is None else labels[idx],
                               None if factors is None else factors[idx])

        return make

    @staticmethod
    def _batch(images: np.ndarray, labels: np.ndarray | None, factors: np.ndarray | None = None) -> Batch:
        # (B, H, W, C) -> (B, C, H, W). A channels-last view would be free, but its strides leak into the conv
        # weight gradients and DDP warns that they do not match its buckets; one uint8 copy per batch is cheap.
        b, h, w, c = images.shape
        tensor = torch.from_numpy(images)
        tensor = tensor.reshape(b, 1, h, w) if c == 1 else tensor.permute(0, 3, 1, 2).contiguous()
        return Batch(
            tensor,
            None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64)),
            None if factors is None else torch.from_numpy(np.array(factors, dtype=np.float32)),
        )

    # ---- resident

    def _load_resident(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The whole split, decoded once, in file order: uint8 (N, C, H, W) on the device (N excludes the
        samples of skipped shards)."""
        if self._data is None:
            images, labels, factors = self._read_whole()
            tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
            self._data = (
                tensor,
                None if labels is None else torch.from_numpy(labels).to(self.device),
                None if factors is None else torch.from_numpy(factors).to(self.device),
            )
        return self._data

    def _read_whole(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Every shard of the split in file order (under on_corrupt='skip', without the skipped ones)."""
        chunks = list(self._chunks([(shard, 0, int(n)) for shard, n in enumerate(self.counts)]))
        if not chunks:
            raise ShardFormatError(f"{self.location}: no readable shard in split {self.split!r} (skipped: "
                                   f"{sorted(self.skipped_shards)}); re-run the ingest")
        return (np.concatenate([c.images for c in chunks]),
                np.concatenate([c.labels for c in chunks]) if self.has_labels else None,
                np.concatenate([c.factors for c in chunks]) if self.has_factors else None)

    def _resident_batches(self):
        images, labels, factors = self._load_resident()
        n = len(images)  # the slice bounds stay those of index.json's count: skipping changes no rank's length
        if self.shuffle:  # the same permutation on every rank (seed, epoch): the rank slices stay disjoint
            perm = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        else:
            perm = torch.arange(n)
        if self.pad:  # the padded slice wraps like the streamed one
            positions = torch.arange(self.start, self.stop) % n
        else:  # an exact slice of what was read
            positions = torch.arange(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        mine = perm[positions].to(self.device)
        if self.shuffle:  # and a within-rank order of its own, as in streaming mode
            local = torch.randperm(len(mine), generator=_generator(self.seed, self.epoch, self.rank, 1))
            mine = mine[local.to(self.device)]
        count = len(mine) // self.batch_size if self.drop_last else math.ceil(len(mine) / self.batch_size)
        for i in range(count):
            idx = mine[i * self.batch_size : (i + 1) * self.batch_size]

            def make(idx=idx) -> Batch:
                return Batch(
                    images.index_select(0, idx),
                    None if labels is None else labels.index_select(0, idx),
                    None if factors is None else factors.index_select(0, idx),
                )

            yield make


def read_split(
    shard_dir: str | os.PathLike,
    split: str,
    storage_options: dict | None = None,
    with_factors: bool = False,
    verify: bool = False,
    on_corrupt: OnCorrupt = "fail",
) -> tuple:
    """A whole split in file order: uint8 images (N, H, W, C) and labels (N,) or None. For evaluation and plots.

    with_factors=True adds the factors (N, K) float32, or None, as a third element. on_corrupt='skip' leaves
    corrupt shards out, with a warning naming each.
    """
    loader = ShardLoader(shard_dir, split, batch_size=1, shuffle=False, drop_last=False, pad=False,
                         storage_options=storage_options, verify=verify, on_corrupt=on_corrupt)
    images, labels, factors = loader._read_whole()
    return (images, labels, factors) if with_factors else (images, labels)
