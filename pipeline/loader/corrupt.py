"""What a damaged shard raises, and the error and policy the loaders answer it with (a leaf: every loader module
imports it, it imports none of them)."""

from __future__ import annotations

import tarfile
from typing import Literal

from pipeline.errors import ShardFormatError

OnCorrupt = Literal["fail", "skip"]
# What reading a damaged shard raises: our own format checks, tarfile, numpy's .npy header parser (ValueError),
# image decoders (OSError, ValueError, RuntimeError), a truncated stream (EOFError), and storage errors (OSError).
CORRUPTION = (ShardFormatError, tarfile.TarError, ValueError, OSError, EOFError, RuntimeError)


class CorruptShardError(ShardFormatError):
    """A shard could not be read, and the policy is to stop; the message names the shard and the fix."""
