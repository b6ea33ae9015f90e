"""Errors a user can cause and fix.

Every such error ends the CLI with one line on stderr (the message), exit status 2,
no traceback (``--debug`` shows it). Library code raises the most specific subclass;
the message names the problem *and* what to do about it.
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad size, corrupt file, budget too small...)."""

    exit_code = 2


class UsageError(UserError):
    """A bad command-line value (size string, option combination)."""


class ModelSourceError(UserError):
    """MODEL is missing, not a checkpoint, truncated/corrupt, or of an unsupported architecture."""


class CorruptStoreError(UserError):
    """A tensor of a converted weight store failed its checksum."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


class ContextLengthError(UserError):
    """The prompt does not fit in the model's context window."""


class BudgetError(UserError):
    """A memory budget is below the minimum working set."""


class ChatTemplateError(UserError):
    """The model's chat template refused the conversation (its ``raise_exception``) or cannot be rendered."""
