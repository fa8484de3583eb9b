"""Errors caused by the user's input (config, data, checkpoints): the CLI prints them as one ``error:`` line,
without a traceback, and exits with ``exit_code``; and ``Interrupted``, its one ``interrupted:`` line."""
from __future__ import annotations


class UserError(Exception):
    exit_code = 2  # the input is wrong: nothing was trained


class ConfigError(UserError, ValueError):
    pass


class DatasetNotFoundError(UserError, FileNotFoundError):
    pass


class DataError(UserError, ValueError):
    """A dataset file exists but cannot be read (truncated, corrupt, another format)."""


class CheckpointError(UserError, ValueError):
    pass


class MissingDependencyError(UserError, RuntimeError):
    pass


class RunDirBusyError(UserError, RuntimeError):
    """Another live process holds the run folder (out_dir)."""


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged: a loss, gradient or weight became NaN or infinite. The settings (lr, beta, amp) are
    the usual cause; the last good checkpoint is kept."""

    exit_code = 3  # the run started and stopped: sweeps can tell it from rejected input (2)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a long command. The CLI prints ``interrupted: <str(self)>`` as one line
    and exits with ``exit_code``; ``resume_from`` is the position a rerun continues from (None: nothing was saved).
    A KeyboardInterrupt, so that code which stops on Ctrl-C stops on it too."""

    exit_code = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

    def __init__(self, advice: str, resume_from: str | None = None, report: bool = True):
        super().__init__(advice)
        self.resume_from = resume_from
        self.report = report  # False on the ranks other than 0 of a multi-process run: one line, not one per rank
