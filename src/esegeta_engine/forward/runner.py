"""Execution forms: how the score model calls the user's network.

An :class:`ExecutionForm` says whether the network sees the whole volume (padded to
sizes it accepts and cropped back) or a sliding window of patches, and in which
precision. :func:`build_runner` turns it into the module that sits between the
output selection and the target in :class:`~esegeta_engine.forward.scoring.ScoreModel`;
:func:`execution_form` resolves a config's ``execution`` section for one input size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import ConfigError
from esegeta_engine.forward.cancel_points import cancel_points
from esegeta_engine.forward.sliding import SlidingWindow, WindowSettings

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.config import ExecutionConfig
    from esegeta_engine.forward.scoring import EvaluationMonitor

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExecutionForm:
    """How one score model runs the network.

    Attributes
    ----------
    sliding : WindowSettings or None
        Sliding-window settings, or ``None`` for one whole-volume call.
    divisible_by : int
        Whole-volume inputs are padded so each spatial size is a multiple of this
        (U-Nets need multiples of 2**depth); outputs are cropped back. 1: no padding.
    padding : str
        Padding mode for that padding (``constant`` zero, ``reflect``, ``replicate``).
    precision : {"fp32", "fp16", "bf16"}
        Autocast dtype of the network's forward pass (targets and gradients stay fp32).
    support : torch.Tensor or None
        Boolean mask of the output voxels the target reads (ROI / voxel targets);
        sliding-window execution skips patches that do not touch it.
    """

    sliding: WindowSettings | None = None
    divisible_by: int = 1
    padding: str = "constant"
    precision: str = "fp32"
    support: torch.Tensor | None = None

    def with_precision(self, precision: str) -> ExecutionForm:
        """The same form in another precision (the non-finite fallback uses fp32)."""
        return replace(self, precision=precision)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for the manifest."""
        d: dict[str, Any] = {"mode": "sliding_window" if self.sliding else "whole",
                             "precision": self.precision}
        if self.sliding:
            s = self.sliding
            d.update(patch_size=list(s.patch_size), overlap=s.overlap, blend=s.blend,
                     sw_batch_size=s.sw_batch_size, padding=s.padding)
        elif self.divisible_by > 1:
            d["divisible_by"] = self.divisible_by
        return d


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any] | None:
    """A context-manager factory for ``precision`` on ``device`` (None for fp32).

    Raises
    ------
    ConfigError
        If the device cannot run that precision.
    """
    dtype = PRECISIONS.get(precision, "bad")
    if dtype == "bad":
        raise ConfigError(f"execution.precision {precision!r} is unknown", "use fp32, fp16 or bf16")
    if dtype is None:
        return None
    kind = device.type
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{device} does not support bf16", "use execution.precision: fp16 (or fp32)")
    if kind == "cpu" and dtype == torch.float16:
        raise ConfigError("fp16 autocast is not supported for the CPU here",
                          "use execution.precision: bf16 on the CPU (fp16 is for CUDA devices)")
    try:
        torch.autocast(device_type=kind, dtype=dtype)
    except Exception as exc:  # torch rejects the combination
        raise ConfigError(f"{device} cannot run {precision}: {exc}",
                          "use execution.precision: fp32") from None
    return lambda: torch.autocast(device_type=kind, dtype=dtype)


class WholeVolume(nn.Module):
    """The network on the whole input, padded to a multiple of ``divisible_by`` and cropped back.

    ``check`` (e.g. the monitor's cancel check) also runs between the network's modules, forward
    and backward (:func:`~esegeta_engine.forward.cancel_points.cancel_points`): Cancel does not wait
    for a whole-volume pass to end.
    """

    def __init__(self, net: nn.Module, divisible_by: int = 1, padding: str = "constant",
                 autocast: Callable[[], Any] | None = None, check: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.net = net
        self.divisible_by = int(divisible_by)
        self.padding = padding
        self.autocast = autocast
        self.check = check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        pad = padding_for(spatial, self.divisible_by)
        xp = F.pad(x, pad, mode=self.padding) if any(pad) else x
        with cancel_points(self.check):
            if self.autocast is not None:
                with self.autocast():
                    y = self.net(xp)
                y = y.float()
            else:
                y = self.net(xp)
        if any(pad) and y.dim() == x.dim():
            y = y[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
        return y


def padding_for(spatial: Sequence[int], divisible_by: int) -> list[int]:
    """``F.pad`` amounts (after each axis only) reaching a multiple of ``divisible_by``."""
    if divisible_by <= 1:
        return [0] * (2 * len(spatial))
    pad: list[int] = []
    for s in reversed(spatial):
        pad.extend([0, (-s) % divisible_by])
    return pad


def build_runner(net: nn.Module, form: ExecutionForm, monitor: EvaluationMonitor) -> nn.Module:
    """The module between output selection and target for ``form``."""
    device = _device_of(net)
    autocast = autocast_factory(form.precision, device)
    if form.sliding is None:
        return WholeVolume(net, form.divisible_by, form.padding, autocast, check=monitor.check)
    sw = SlidingWindow(net, form.sliding, before_batch=monitor.patch_batch, autocast=autocast)
    sw.check = monitor.check
    sw.support = form.support
    return sw


def bind_monitor(runner: nn.Module, monitor: EvaluationMonitor) -> None:
    """Point the checks of ``runner`` (built by :func:`build_runner`) at ``monitor``: before each patch
    batch and between the network's modules."""
    if isinstance(runner, (WholeVolume, SlidingWindow)):
        runner.check = monitor.check
    if isinstance(runner, SlidingWindow):
        runner.before_batch = monitor.patch_batch


def _device_of(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


def execution_form(cfg: ExecutionConfig | None, spatial: Sequence[int],
                   divisible_by: int = 1) -> ExecutionForm:
    """Resolve a config's ``execution`` section for an input of size ``spatial``.

    ``mode: auto`` (default) uses the sliding window when a patch size is given and
    the input is larger than the patch on some axis, and the whole volume otherwise.
    """
    if cfg is None:
        return ExecutionForm(divisible_by=divisible_by)
    size = tuple(int(s) for s in spatial)
    patch = cfg.patch_tuple(len(size))
    sliding = cfg.mode == "sliding_window" or (
        cfg.mode == "auto" and patch is not None and any(s > p for s, p in zip(size, patch)))
    if sliding and patch is None:
        raise ConfigError("execution.mode is sliding_window but execution.patch_size is not set",
                          "give the network's training patch size, e.g. execution.patch_size: [96, 96, 96]")
    settings = (WindowSettings(patch, cfg.overlap, cfg.blend, cfg.sw_batch_size, cfg.padding)
                if sliding else None)
    div = divisible_by if cfg.divisible_by == "auto" else int(cfg.divisible_by or 1)
    return ExecutionForm(settings, div, cfg.padding, cfg.precision)


@contextlib.contextmanager
def no_op() -> Iterator[None]:
    """A context that does nothing (fp32)."""
    yield
