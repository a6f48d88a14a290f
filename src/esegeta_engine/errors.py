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


class PickledModuleError(ModelLoadError):
    """The model file is a pickled module: loading it runs code, so the user must say they trust it."""


class BundleTrustError(ModelLoadError):
    """A MONAI bundle's config would run Python: the user must say they trust the bundle."""


class VolumeError(EsegetaError):
    """An input volume is missing, corrupt, of the wrong shape or not finite."""


class VolumeShapeError(VolumeError):
    """An input volume's dimensions or channels do not fit what the model takes."""


class TargetError(EsegetaError):
    """The chosen target cannot be built from the model output."""


class MethodError(EsegetaError):
    """A method cannot run with the given parameters, model or input."""


class Cancelled(Exception):
    """The run was cancelled by the user between two model evaluations."""


class MethodTimeout(Exception):
    """A method exceeded its time budget (checked between model evaluations)."""


class OutputError(EsegetaError):
    """The output folder cannot be used: not writable, full, locked or holding inputs."""


_TORCHSCRIPT_PREAMBLE = "The following operation failed in the TorchScript interpreter"


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """One line saying why ``exc`` happened, ``Type: message``.

    A TorchScript model's errors start with a preamble and the TorchScript
    traceback; the real reason (``builtins.ValueError: ...``) is their last
    line, so that is what is kept.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith(_TORCHSCRIPT_PREAMBLE):
        reason = lines[-1].removeprefix("builtins.")
        return f"in the TorchScript model: {reason}"[:limit]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:limit] if first else type(exc).__name__
