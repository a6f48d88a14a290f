"""Output selection, layer listing and the guard that leaves a user's model exactly
as it was after any run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError


class OutputSelector(nn.Module):
    """Wrap a model whose output is a tuple, list or dict, returning one tensor.

    Parameters
    ----------
    model : nn.Module
        The user's model (not copied, not changed).
    output : int, str or None
        Index or key of the output to explain; ``None`` requires a tensor output.
    """

    def __init__(self, model: nn.Module, output: int | str | None = None) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(x), self.output)


def select_output(out: Any, output: int | str | None) -> torch.Tensor:
    """Pick one tensor from a model's output (see :class:`OutputSelector`)."""
    if isinstance(out, torch.Tensor):
        if output not in (None, 0):
            raise ModelLoadError(f"model.output is {output!r} but the model returns a single tensor",
                                 "remove model.output")
        return out
    if isinstance(out, Mapping):
        keys = list(out)
        if output is None or output not in out:
            raise ModelLoadError(f"the model returns a dict with keys {keys}; model.output is {output!r}",
                                 f"set model.output to one of {keys}")
        return out[output]
    if isinstance(out, (tuple, list)):
        if output is None or not isinstance(output, int) or not -len(out) <= output < len(out):
            raise ModelLoadError(
                f"the model returns {len(out)} outputs (deep supervision?); model.output is {output!r}",
                f"set model.output to an index 0..{len(out) - 1} (usually 0, the full-resolution output)",
            )
        return out[output]
    raise ModelLoadError(f"the model returned {type(out).__name__}, not a tensor", "wrap it to return a tensor")


def list_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Return ``(name, type)`` of every named submodule, in registration order.

    These names are what layer methods accept in ``layers: [...]``. A TorchScript module's type is
    the Python class it was scripted from (``original_name``), not ``RecursiveScriptModule``.
    """
    return [(name, getattr(m, "original_name", None) or type(m).__name__)
            for name, m in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return submodule ``name`` (dotted path) without eval.

    Raises
    ------
    ModelLoadError
        If no module has that name; the message lists a few that exist.
    """
    refusal = getattr(model, "layer_refusal", None)  # a deployed pipeline may refuse some layers
    if callable(refusal) and name:
        why = refusal(name)
        if why is not None:
            raise ModelLoadError(*why)
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    import difflib

    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
    raise ModelLoadError(
        f"the model has no layer named {name!r}",
        ("closest names: " + ", ".join(close) + "; " if close else "")
        + "run `esegeta layers MODEL` for the full list",
    )


def is_torchscript(model: nn.Module) -> bool:
    """True if ``model`` (or what it wraps) is a TorchScript module."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a run, and restore it afterwards.

    On exit — normal, error or cancellation — the training flag and
    ``requires_grad`` of every module/parameter are restored and any hook that
    was added during the run and not removed is removed. Parameters and
    buffers are not touched by the engine; tests check they stay equal.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    hooks: list[tuple[nn.Module, str, set[Any]]] = []
    for m in modules:
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                hooks.append((m, attr, set(d.keys())))
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for m, attr, before in hooks:
            d = getattr(m, attr)
            for key in [k for k in d if k not in before]:
                del d[key]
