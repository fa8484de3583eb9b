"""Errors caused by the user's input (config, data, checkpoints): the CLI prints them without a traceback."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    pass


class DatasetNotFoundError(UserError, FileNotFoundError):
    pass


class CheckpointError(UserError, ValueError):
    pass


class MissingDependencyError(UserError, RuntimeError):
    pass
