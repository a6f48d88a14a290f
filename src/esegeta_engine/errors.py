"""User-facing errors.

Every problem a user can cause (a bad file, a bad config value, a model that
does not fit its input) is raised as an :class:`EsegetaError` whose message
names the problem and what to do about it. The CLI prints these without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EsegetaError(Exception):
    """A problem with the user's input, with a hint on how to fix it.

    Parameters
    ----------
    problem : str
        What is wrong, naming the file, key or value.
    fix : str, optional
        What the user can do about it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  -> {fix}")


class ConfigError(EsegetaError):
    """The configuration is invalid (unknown key, bad value, missing file)."""


class ModelLoadError(EsegetaError):
    """The model file cannot be loaded or does not fit its class."""


class VolumeError(EsegetaError):
    """An input volume is missing, corrupt, of the wrong shape or not finite."""


class TargetError(EsegetaError):
    """The chosen target cannot be built from the model output."""


class MethodError(EsegetaError):
    """A method cannot run with the given parameters, model or input."""


class Cancelled(Exception):
    """The run was cancelled by the user between two model evaluations."""


class MethodTimeout(Exception):
    """A method exceeded its time budget (checked between model evaluations)."""
