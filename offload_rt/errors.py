"""Errors a user can cause and fix.

Every such error ends the CLI with one line on stderr (the message), exit status 2,
no traceback (``--debug`` shows it). Library code raises the most specific subclass;
the message names the problem *and* what to do about it.

The storage layer sits below offload_rt and raises its own errors (``storage.errors``). Each class
here with a ``_storage_twin`` also matches its storage twin (``except UserError`` catches every
``StorageError``; ``except ModelSourceError`` a storage ``ModelSourceError``), so callers name one
hierarchy and storage never imports offload_rt.
"""

import sys


class _WithStorageTwin(type):
    """Subclass and instance checks that also accept the class's twin in storage.errors (once imported)."""

    def __subclasscheck__(cls, sub) -> bool:
        if type.__subclasscheck__(cls, sub):
            return True
        twin = cls.__dict__.get("_storage_twin")
        errors = sys.modules.get("storage.errors")
        return bool(twin and errors is not None and isinstance(sub, type)
                    and issubclass(sub, getattr(errors, twin)))

    def __instancecheck__(cls, obj) -> bool:
        return cls.__subclasscheck__(type(obj))


class UserError(Exception, metaclass=_WithStorageTwin):
    """A mistake the user can fix (bad path, bad size, corrupt file, budget too small...)."""

    exit_code = 2
    _storage_twin = "StorageError"


class UsageError(UserError):
    """A bad command-line value (size string, option combination)."""

    _storage_twin = "StorageUsageError"


class ModelSourceError(UserError):
    """MODEL is missing, not a checkpoint, truncated/corrupt, or of an unsupported architecture."""

    _storage_twin = "ModelSourceError"


class CorruptStoreError(UserError):
    """A tensor of a converted weight store failed its checksum."""

    _storage_twin = "CorruptStoreError"

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


class ContextLengthError(UserError):
    """The prompt does not fit in the model's context window."""


class BudgetError(UserError):
    """A memory budget is below the minimum working set."""


class ChatTemplateError(UserError):
    """The model's chat template refused the conversation (its ``raise_exception``) or cannot be rendered."""
