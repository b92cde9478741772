"""Errors a user can act on: each message names the problem and the fix."""


class CrossdiffError(Exception):
    """Base class for every error crossdiff raises on bad input or a failed run."""


class CacheError(CrossdiffError):
    """An activation cache is missing, corrupt, or does not match what reads it."""


class ConfigError(CrossdiffError):
    """A setting is out of range or inconsistent with the data (e.g. k > dict_size)."""


class ModelMismatchError(CrossdiffError):
    """Base and chat models (or a crosscoder and a cache) do not belong together."""


class TrainingDivergedError(CrossdiffError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CheckpointError(CrossdiffError):
    """A training checkpoint is foreign, corrupt or in a format crossdiff never loads (a pickle)."""
