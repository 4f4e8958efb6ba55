"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (config, file, URI, credentials): the message is one line naming what is wrong."""


class ConfigError(UserError):
    """A run or sweep config failed validation."""


class StorageError(UserError):
    """Storage is unreachable, misconfigured or refuses us (bad credentials, missing bucket)."""


class CheckpointError(UserError):
    """A checkpoint is missing, partial or corrupt."""
