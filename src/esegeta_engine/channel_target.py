"""Filter and neuron targets: the activation of channel ``k`` at a layer as the explained score.

TorchEsegeta's "layer activation with guided backprop" (after Springenberg et al. 2015 and
the CNN-visualisation collection) explains what drives one filter of an inner layer rather
than a class: the score is the mean activation of channel ``k`` of a chosen module, or one
unit (neuron) of it. :class:`LayerChannelTarget` is a :class:`~esegeta_engine.targets.Target`
like the others, so every gradient (and perturbation) method explains it unchanged.

The activation is captured by a forward hook that :class:`~esegeta_engine.forward.scoring.ScoreModel`
opens around each forward pass (:meth:`LayerChannelTarget.capture`) and removes right after,
so the user's model carries no hook between evaluations.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from esegeta_engine.forward.scoring import ScoreModel
>>> net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
>>> score = ScoreModel(net, LayerChannelTarget("1", channel=2))
>>> score(torch.randn(1, 1, 4, 4, 4)).shape
torch.Size([1, 1])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import TargetError
from esegeta_engine.models import get_layer
from esegeta_engine.targets import Target


class LayerChannelTarget(Target):
    """Mean activation of channel ``channel`` at module ``layer`` (or one unit of it).

    Parameters
    ----------
    layer : str
        Module name as listed by :func:`esegeta_engine.models.list_layers`.
    channel : int
        Channel (filter) index of the layer's output ``(N, C, *grid)``, or feature index of
        a linear layer's ``(N, F)``.
    unit : sequence of int, optional
        A position on the layer's grid (model axis order): the score is that one unit
        (a neuron target) instead of the channel mean.
    activation : {"none", "softmax", "sigmoid"}
        Applied to the layer's output over its channel axis first.
    """

    kind = "channel"

    def __init__(self, layer: str, channel: int = 0, unit: Sequence[int] | None = None,
                 activation: str = "none") -> None:
        super().__init__(activation)
        self.layer = layer
        self.channel = int(channel)
        self.unit = tuple(int(i) for i in unit) if unit else None
        self._seen: list[torch.Tensor] = []
        self._capturing = False

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[None]:
        """Hook ``layer`` of ``model`` for one forward pass; the hook is gone afterwards."""
        module = get_layer(model, self.layer)

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            self._seen.append(out)

        try:
            handle = module.register_forward_hook(hook)
        except RuntimeError:  # TorchScript modules take no Python hooks
            raise TargetError(
                f"the channel target needs a Python forward hook on layer '{self.layer}', which a "
                "TorchScript model does not run",
                "load the model as a state dict plus its class (model.format: state_dict)",
            ) from None
        self._seen, self._capturing = [], True
        try:
            yield
        finally:
            handle.remove()
            self._seen, self._capturing = [], False

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        act = self._activation()
        a = self.activation(act)[:, self.channel]
        if self.unit is None:
            return a.reshape(a.shape[0], -1).mean(dim=1, keepdim=True)
        grid = tuple(a.shape[1:])
        if len(self.unit) != len(grid) or any(not 0 <= i < s for i, s in zip(self.unit, grid)):
            raise TargetError(
                f"unit {list(self.unit)} is outside the grid {list(grid)} of layer '{self.layer}'",
                f"give {len(grid)} indices with 0 <= index < size on each axis of the layer's grid",
            )
        return a[(slice(None), *self.unit)].unsqueeze(1)

    def _activation(self) -> torch.Tensor:
        if not self._capturing:
            raise TargetError(
                f"the channel target of layer '{self.layer}' was called outside a forward pass of "
                "the score model",
                "call it through esegeta_engine.forward.scoring.ScoreModel, which captures the activation",
            )
        if not self._seen:
            raise TargetError(f"layer '{self.layer}' did not run in the model's forward pass",
                              "choose a module the forward pass uses (`esegeta layers MODEL`)")
        if len(self._seen) > 1:
            raise TargetError(
                f"layer '{self.layer}' runs {len(self._seen)} times per forward pass, so its channel "
                "is ambiguous",
                "choose a module that the model calls once (e.g. a convolution, not a shared ReLU)",
            )
        act = self._seen[0]
        if not isinstance(act, torch.Tensor) or act.dim() < 2:
            raise TargetError(f"layer '{self.layer}' does not output a (N, C, ...) tensor",
                              "choose a convolutional or linear layer")
        if not 0 <= self.channel < act.shape[1]:
            raise TargetError(
                f"channel {self.channel} is beyond the layer's channels: layer '{self.layer}' has "
                f"{act.shape[1]}",
                f"set target.channel to 0..{act.shape[1] - 1}",
            )
        return act

    def n_scores(self, output: torch.Tensor) -> int:
        return 1

    def default_classes(self, output: torch.Tensor) -> list[int]:
        return [0]

    def class_label(self, index: int) -> str:
        unit = "-unit" + "_".join(map(str, self.unit)) if self.unit else ""
        return f"{self.layer}-ch{self.channel}{unit}"
