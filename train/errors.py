"""Errors caused by the user's input (config, data, checkpoints): the CLI prints them as one ``error:`` line,
without a traceback, and exits with ``exit_code``."""


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
