"""Filter and neuron targets: the activation of channel ``k`` at a layer as the explained score.

TorchEsegeta's "layer activation with guided backprop" (after Springenberg et al. 2015 and
the CNN-visualisation collection) explains what drives one filter of an inner layer rather
than a class: the score is the mean activation of channel ``k`` of a chosen module, or one
unit (neuron) of it. :class:`LayerChannelTarget` is a :class:`~esegeta_engine.targets.Target`
like the others, so every gradient (and perturbation) method explains it unchanged.

The activation is captured by a forward hook that :class:`~esegeta_engine.forward.scoring.ScoreModel`
opens around each forward pass (:meth:`LayerChannelTarget.capture`) and removes right after,
so the user's model carries no hook between evaluations.

**Under sliding-window execution** the target is evaluated patch-wise like any network output
(:meth:`LayerChannelTarget.on_sliding_window`): :class:`ChannelMap` makes the sliding window's
network map each patch ``x_p`` to the channel-``k`` map ``A_k(x_p)`` of the layer (after the
activation), upsampled to the patch size (nearest neighbour) when the layer is strided; the
window blends these maps like segmentation outputs into ``M(x) = sum_p w_p up(A_k(x_p)) / sum_p w_p``
on the input grid, and the score is the mean of ``M(x)`` over the volume. With one patch covering
the volume and a stride that divides the patch, this is exactly the whole-volume score.

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

import copy

import torch
import torch.nn.functional as F
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
        self.stitched = False  # True: the output is the sliding window's stitched channel map

    def on_sliding_window(self) -> LayerChannelTarget:
        """A copy that scores the stitched channel map :class:`ChannelMap` produces.

        Raises
        ------
        TargetError
            For a unit (neuron) target, whose position on one layer grid has no patch-wise meaning.
        """
        if self.unit is not None:
            raise TargetError(
                "a unit (neuron) of a layer's grid has no patch-wise meaning under sliding-window execution",
                "drop target.unit (the channel mean runs patch-wise) or use execution.mode: whole on an ROI crop")
        out = copy.copy(self)
        out._seen, out._capturing, out.stitched = [], False, True
        return out

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[None]:
        """Hook ``layer`` of ``model`` for one forward pass; the hook is gone afterwards."""
        if self.stitched:  # ChannelMap hooks each patch itself
            yield
            return
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
        if self.stitched:  # (N, 1, *spatial): the blended channel map, activation already applied
            return output.reshape(output.shape[0], -1).mean(dim=1, keepdim=True)
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


class ChannelMap(nn.Module):
    """The network of a sliding window for a channel target: patch -> channel-``k`` map ``(B, 1, *patch)``.

    Parameters
    ----------
    net : nn.Module
        The output selection holding the user's model (``net.model``).
    target : LayerChannelTarget
        Layer, channel and activation; its hook is opened around each patch batch only.
    """

    def __init__(self, net: nn.Module, target: LayerChannelTarget) -> None:
        super().__init__()
        self.net = net
        self.target = copy.copy(target)
        self.target.stitched = False
        self.notes: list[str] = []

    @property
    def model(self) -> nn.Module:
        """The user's model (held once, by the output selection)."""
        return self.net.model

    @property
    def output(self) -> tuple:
        """What this network returns (keys the sliding window's output cache)."""
        t = self.target
        return ("channel", t.layer, t.channel, t.activation_name, getattr(self.net, "output", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.target
        with t.capture(self.net.model):
            self.net(x)
            act = t._activation()
            k = t.activation(act)[:, t.channel:t.channel + 1]
        patch, grid = tuple(x.shape[2:]), tuple(k.shape[2:])
        if len(grid) != len(patch):
            raise TargetError(
                f"layer '{t.layer}' maps a patch {list(patch)} to {list(k.shape)}, which has no grid to "
                "blend patch-wise", "choose a convolutional layer, or use execution.mode: whole")
        if grid != patch:
            if any(p % g for p, g in zip(patch, grid)):
                note = (f"channel map of layer '{t.layer}' ({list(grid)} per patch {list(patch)}) upsampled "
                        "to the patch by nearest neighbour at a non-integer factor: not an exact replication")
                if note not in self.notes:
                    self.notes.append(note)
            k = F.interpolate(k, size=patch, mode="nearest")
        return k
