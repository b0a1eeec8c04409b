"""Where shard directories live: a local path or any fsspec URL (s3://bucket/prefix, memory://x, ...).

Writers stage each shard as a local file (its sha256 is computed there) and `put` it; a local destination
is written in place. Small JSON files are written whole: a local one through a temporary name and a rename,
an object-store one by a single PUT, which is atomic there (the object appears complete or not at all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_url(location: str | os.PathLike) -> bool:
    """A location with a scheme (s3://, gs://, file://...): kept as a string, since Path would fold its '//'."""
    return "://" in str(location)


class DestinationError(ValueError):
    """A shard destination that cannot be used: a file, not writable, or holding files vaepipe did not write."""


class Location:
    """A shard directory: `join`, `exists`, `open`, `put`, `write_text` relative to its root."""

    def __init__(self, root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.local else path.rstrip("/")
        self.url = self.root if self.local else f"{self.fs.unstrip_protocol(self.root)}"
        self.storage_options = dict(storage_options or {})

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def display(self, name: str) -> str:
        return self.path(name) if self.local else f"{self.url}/{name}"

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def isfile(self, name: str) -> bool:
        return self.fs.isfile(self.path(name))

    def mkdir(self) -> None:
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)  # object stores have no directories to make

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the root) matching `pattern`, sorted."""
        prefix = len(self.root) + 1
        return sorted(p[prefix:] for p in self.fs.glob(self.path(pattern)))

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self.path(name), mode)

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self.path(name)).decode()

    def write_text(self, name: str, text: str) -> None:
        """Write a small file whole (atomically, see the module docstring)."""
        if self.local:
            target = Path(self.path(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(self.path(name), text.encode())

    def put(self, local_file: str, name: str) -> None:
        """Move a finished local file to `name` (a rename when local, an upload otherwise)."""
        if self.local:
            if os.path.abspath(local_file) != self.path(name):
                shutil.move(local_file, self.path(name))
        else:
            self.fs.put_file(local_file, self.path(name))
            os.unlink(local_file)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def listdir(self) -> list[str]:
        """Names of the entries directly under the root, sorted; [] when the root does not exist."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        prefix = len(self.root) + 1
        return sorted(p.rstrip("/")[prefix:] for p in entries if p.rstrip("/") != self.root)

    def create(self, name: str, text: str) -> bool:
        """Write `name` only if it does not exist yet, atomically; False when it already exists.

        Local: the text goes to a temporary file that is then hard-linked to `name`; link() fails with
        EEXIST atomically (also on NFS) and the file never appears half-written. Elsewhere: fsspec's
        create-if-absent `pipe_file(mode="create")`, which is atomic where the store offers a conditional
        write (S3's If-None-Match) and check-then-write on the rest (memory://, in tests).
        """
        if not self.local:
            try:
                self.fs.pipe_file(self.path(name), text.encode(), mode="create")
            except FileExistsError:
                return False
            return True
        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
