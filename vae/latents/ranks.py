"""An encode on many ranks with Accelerate: each rank encodes the groups g with g % world_size == rank (so every
image exactly once, and no two ranks write one file), rank 0 checks the output directory first and writes
index.json once every rank is done.

Launched as `accelerate launch $(which vaepipe) encode ...` (any launcher that sets WORLD_SIZE); a single process
encodes alone, without Accelerate. Ranks share nothing but the output directory and two barriers.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.latents import LatentIndex
from vae.latents.encode import EncodeJob, EncodeOptions
from vae.latents.model import Encoder


def world_size() -> int:
    """Processes in this encode, as the launcher (accelerate, torchrun) says; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def encode_on_ranks(encoder: Encoder, shard_dir: str | os.PathLike, out_dir: str | Path,
                    options: EncodeOptions | None = None, overwrite: bool = False) -> LatentIndex | None:
    """This rank's share of the encode; the index on rank 0 (None on the others)."""
    options = options or EncodeOptions()
    if world_size() == 1:
        job = EncodeJob.prepare(encoder, shard_dir, out_dir, options, overwrite)
        for group in job.groups():
            job.run(group)
        return job.finalize()
    from accelerate import PartialState  # the process group alone: an encode has no model to wrap or optimise

    state = PartialState(cpu=options.device == "cpu")
    if options.device != "cpu":
        options = options.model_copy(update={"device": str(state.device)})
    rank, world = state.process_index, state.num_processes
    if rank == 0:  # the output directory is checked (and an old index removed under overwrite) once, first
        job = EncodeJob.prepare(encoder, shard_dir, out_dir, options, overwrite, rank=0)
    state.wait_for_everyone()
    if rank != 0:
        job = EncodeJob.prepare(encoder, shard_dir, out_dir, options, rank=rank)
    for group in job.groups(rank, world):
        job.run(group)
    state.wait_for_everyone()
    index = job.finalize() if rank == 0 else None
    state.wait_for_everyone()  # no rank exits (and tears down the group) while rank 0 writes
    return index
