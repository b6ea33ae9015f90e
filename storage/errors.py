"""The storage layer's own errors: problems a user can fix, each message saying what to do.

storage sits below offload_rt and does not import it; the CLI maps these to its contract
(one line on stderr, exit status 2).
"""

from __future__ import annotations

from pathlib import Path


class StorageError(Exception):
    """A problem with the weight store or where it is written that the user can fix."""


class ModelSourceError(StorageError):
    """MODEL is missing, not a checkpoint, truncated or corrupt (as the storage layer reads it)."""


class CorruptStoreError(StorageError):
    """A tensor of a converted weight store failed its checksum, or a chunk file is missing or truncated."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor  # the tensor's name in the store


class StorageUsageError(StorageError):
    """A bad value for an option the storage layer reads (``--weights``)."""


class NoSpaceError(StorageError):
    """The filesystem of the store directory has less free space than a conversion needs."""

    def __init__(self, message: str, *, needed: int, free: int, directory: Path):
        super().__init__(message)
        self.needed = needed  # bytes the new store will take (estimate, from the source's tensors)
        self.free = free  # bytes free on the store directory's filesystem
        self.directory = directory  # the store directory (--offload-dir)
