"""The errors a user can fix, by what they concern. The CLI prints any of them as one line that
names the file, field, function or row (the traceback only under --debug); other exceptions are
bugs and keep their traceback.

Each is also a ValueError (or, for rewards and stops, a RuntimeError), so code that caught
those before still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave or asked for is wrong; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config field (YAML, CLI override or GRPOConfig): the message starts with its name."""


class DataError(UserError, ValueError):
    """A dataset file or row: the message names the file (and line or row)."""


class ModelError(UserError, ValueError):
    """The model or tokenizer cannot be loaded from what was given."""


class RunFolderError(UserError, ValueError):
    """The run folder (train.output_dir) cannot be used as asked: it holds a run, is a file, is read-only."""


class ResumeError(UserError, ValueError):
    """--resume cannot continue exactly: no usable checkpoint, or an option that must not change did."""


class TrainingStopped(UserError, RuntimeError):
    """The run stopped before max_steps on purpose (an interrupt, repeated non-finite losses); what
    was finished is saved and the message says how to continue."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
