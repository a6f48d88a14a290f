"""Activation checkpointing: chosen blocks of a network keep only their inputs for the backward.

A gradient through one large patch keeps the autograd graph of the whole network call: every
convolution's input, every normalisation's input, every non-linearity's output. For an nnU-Net
patch of 80x160x160 that graph alone is several GB, far above what the no-gradient prediction
needs. :func:`checkpointed` wraps the forward of chosen blocks in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` for the duration of a ``with``
block: each block then stores its input only, and its inside is recomputed when the backward
reaches it. The instance attribute ``forward`` is set and removed again (an instance ``forward``
the user had is put back), so the model is exactly as it was afterwards, also after an error; no
parameter, buffer, training flag or hook is touched. Under ``torch.no_grad`` a wrapped block runs
plainly (there is nothing to store).

Which methods may use it. A recomputed block must compute the same numbers again, so only methods
whose result cannot change when a forward runs twice: plain autograd (saliency, input x gradient,
integrated gradients, SmoothGrad/VarGrad, GradientSHAP, extremal perturbation's mask gradient).
A method with module hooks (guided backprop, DeepLIFT, LRP, layer methods and CAMs) would see its
hooks fire again during the recomputation; it never runs checkpointed. This is the method's own
declaration, :attr:`~esegeta_engine.methods.registry.MethodSpec.recomputable`.

Which blocks. A model may name its own (``checkpoint_segments()``: the nnU-Net pipeline names the
blocks of its fold networks); otherwise the blocks of nnU-Net's ``dynamic_network_architectures``
U-Nets (PlainConvUNet, ResidualEncoderUNet) are found wherever they sit in the model
(:func:`unet_segments`). Other models have no known blocks: ``checkpointing: on`` is refused for
them with one line, ``auto`` leaves them alone.

Cost. Each wrapped block's forward runs once more in the backward (nested blocks: more than once).
These recomputations happen inside a network evaluation already counted, so they are not network
evaluations: counts and cost estimates do not change, and each map's record says whether
checkpointing was used (``execution.checkpointing``) and how many checkpointed block calls ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from esegeta_engine.errors import ConfigError, MethodError
from esegeta_engine.forward.checkpoint_decoder import (decoder_refusal, first_blocks, fused_forward,
                                                       last_stage_refusal)

SETTINGS = ("auto", "on", "off")
STAGE_TYPES = ("StackedConvBlocks", "StackedResidualBlocks")
"""nnU-Net U-Net stages (``dynamic_network_architectures``): a stage's blocks at one resolution."""
BLOCK_TYPES = ("ConvDropoutNormReLU", "BasicBlockD", "BottleneckD")
"""nnU-Net U-Net blocks: one convolution + norm + non-linearity, or one residual block."""


@dataclass
class CheckpointUse:
    """What checkpointing did for one method run (written into the map's record).

    Attributes
    ----------
    setting : {"auto", "on", "off"}
        ``execution.checkpointing`` as configured.
    segments : int
        Blocks wrapped (0: not used).
    why : str
        Why it was or was not used.
    calls : int
        Outermost checkpointed block calls that ran with gradients (0: nothing was stored less).
    decoder : str
        How the U-Net decoders were split (fused steps from before the up-sampling, or per stage and why).
    """

    setting: str
    segments: int = 0
    why: str = ""
    calls: int = 0
    decoder: str = ""

    @property
    def used(self) -> bool:
        """True when at least one block ran checkpointed."""
        return self.calls > 0

    def describe(self) -> dict[str, Any]:
        """The record's ``execution.checkpointing``."""
        d: dict[str, Any] = {"setting": self.setting, "used": self.used, "why": self.why}
        if self.segments:
            d.update(segments=self.segments, checkpointed_block_calls=self.calls,
                     recomputation="each checkpointed block's forward runs again in the backward (inside a "
                                   "counted network evaluation: not a network evaluation of its own)")
            if self.decoder:
                d["decoder"] = self.decoder
        return d


@dataclass
class _Counter:
    calls: int = 0
    depth: int = 0
    active: bool = True
    modules: list[nn.Module] = field(default_factory=list)


_MISSING = object()


@contextlib.contextmanager
def checkpointed(modules: Sequence[nn.Module]) -> Iterator[_Counter]:
    """Run ``modules`` checkpointed inside the ``with`` block; restore them exactly after.

    Parameters
    ----------
    modules : sequence of nn.Module
        Blocks whose forward keeps only its inputs under autograd. A module inside another listed
        one is checkpointed again inside the outer recomputation (nested checkpointing).

    Yields
    ------
    counter
        ``counter.calls``: how many outermost wrapped calls ran with gradients so far (a block nested in
        another runs inside it, and again in its recomputation: not counted).

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1))
    >>> x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    >>> with checkpointed([net[0], net[2]]) as counter:
    ...     g, = torch.autograd.grad(net(x).sum(), x)
    >>> counter.calls, "forward" in net[0].__dict__
    (2, False)
    """
    counter = _Counter(modules=list(modules))
    installed: list[tuple[nn.Module, Any]] = []
    try:
        for m in dict.fromkeys(modules):  # each module once, in the given order
            fused = decoder_refusal(m, _ours) is None  # a U-Net decoder: fused steps (checkpoint_decoder)
            run = _decoder_wrapper(m, m.forward, counter) if fused else _wrapper(m.forward, counter)
            run._esegeta_saved = m.__dict__.get("forward", _MISSING)  # type: ignore[attr-defined]
            object.__setattr__(m, "forward", run)
            installed.append((m, run))
        yield counter
    finally:
        counter.active = False
        for m, _ in reversed(installed):
            _unwind(m)


def _unwind(m: nn.Module) -> None:
    """Remove every wrapper of a finished ``with`` block from the top of ``m``'s instance ``forward``.

    Two runs may overlap on one model (a job the watchdog abandoned still unwinding while the next
    one runs): the later one wraps the earlier one's wrapper. Each exit takes off the finished
    wrappers from the top down and stops at one still in use, so whichever run ends last puts back
    exactly what the user had, and no run removes another's wrapper while that run is going on.
    """
    top = m.__dict__.get("forward", _MISSING)
    while active_wrapper(top) is False:
        top = top._esegeta_saved
    if top is _MISSING:
        m.__dict__.pop("forward", None)
    else:
        object.__setattr__(m, "forward", top)


def _ours(forward: Any) -> bool:
    return active_wrapper(forward) is not None


def active_wrapper(forward: Any) -> bool | None:
    """True / False for a checkpointing wrapper still in use / finished; None for anything else."""
    counter = getattr(forward, "_esegeta_counter", None)
    return None if counter is None else counter.active


def wrapped_blocks(model: nn.Module) -> int:
    """Modules of ``model`` whose forward is a checkpointing wrapper still in use."""
    return sum(bool(active_wrapper(m.__dict__.get("forward"))) for m in model.modules())


def _wrapper(forward: Any, counter: _Counter) -> Any:
    def inside(*args: Any, **kwargs: Any) -> Any:  # the block's forward, first run and recomputation alike
        counter.depth += 1
        try:
            return forward(*args, **kwargs)
        finally:
            counter.depth -= 1

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or not counter.active:  # a finished run's wrapper only passes through
            return forward(*args, **kwargs)
        if counter.depth == 0:  # an outermost block (nested ones run inside it)
            counter.calls += 1
        return checkpoint(inside, *args, use_reentrant=False, **kwargs)

    run._esegeta_counter = counter  # type: ignore[attr-defined]
    return run


def _decoder_wrapper(decoder: nn.Module, forward: Any, counter: _Counter) -> Any:
    """The decoder's forward as checkpointed steps (:func:`.checkpoint_decoder.fused_forward`)."""
    def step(fn: Any, *tensors: torch.Tensor) -> torch.Tensor:
        return _wrapper(fn, counter)(*tensors)

    def run(skips: Any) -> Any:
        if not torch.is_grad_enabled() or not counter.active:  # a finished run's wrapper only passes through
            return forward(skips)
        return fused_forward(decoder, skips, step, _ours)

    run._esegeta_counter = counter  # type: ignore[attr-defined]
    return run


def unet_segments(model: nn.Module, nested_fraction: float = 0.5) -> list[nn.Module]:
    """The blocks of nnU-Net's ``dynamic_network_architectures`` U-Nets inside ``model`` to checkpoint.

    Every encoder stage (:data:`STAGE_TYPES`) is one segment. nnU-Net's ``UNetDecoder`` is one too: it
    runs as checkpointed steps that begin before each stage's up-sampling and skip concat, so the
    concatenated stage input is never stored (:mod:`.checkpoint_decoder`; the last stage, where the
    backward starts, as one step up to its first block, then block by block). Any other decoder keeps
    the per-stage scheme: every decoder stage but the last is a segment (the backward starts there, so
    recomputing it at once would hold the same tensors as storing them). Inside the stages whose
    feature maps are the largest (channels per input voxel at least ``nested_fraction`` of the largest
    level's) each block (:data:`BLOCK_TYPES`) is a segment too, so recomputing a large stage keeps one
    block's graph at a time. Measured on the 80x160x160 nnU-Net plan's network at a 32x64x64 patch, the
    largest sum of live tensors during forward + backward, in 32-channel full-resolution tensors: 20.8 without
    checkpointing, 12.8 with the per-stage decoder, 10.5 with the fused one, 7.2 for the graph-free forward
    (peak RSS at 256x256x128 in ``docs/models.md``).

    Returns
    -------
    list of nn.Module
        Outer segments before the blocks nested in them; empty when no such U-Net is found.
    """
    out: list[nn.Module] = []
    for net in model.modules():
        encoder = getattr(net, "encoder", None)
        decoder = getattr(net, "decoder", None)
        if encoder is None or decoder is None or not hasattr(encoder, "strides"):
            continue
        sizes = _stage_sizes(encoder)
        large = {i for i, s in enumerate(sizes) if s >= nested_fraction * max(sizes)}
        stages: list[tuple[int, nn.Module]] = []
        stem = getattr(encoder, "stem", None)
        if stem is not None:
            stages.append((0, stem))
        for i, stage in enumerate(encoder.stages):
            stages.append((i, stage))
        n = len(encoder.stages)
        dec = list(getattr(decoder, "stages", []))
        for s, stage in enumerate(dec):
            stages.append((n - 2 - s, stage))  # decoder stage s works at encoder level -(s + 2)
        last = dec[-1] if dec else None
        fused = decoder_refusal(decoder, _ours) is None  # the decoder's own steps replace its stages
        in_steps = {id(m) for m in first_blocks(decoder)} if fused else set()
        for level, stage in stages:
            if stage is not last and not (fused and any(stage is d for d in dec)):
                out.extend([m for m in stage.modules() if type(m).__name__ in STAGE_TYPES][:1])
            if level in large:
                out.extend(m for m in stage.modules() if type(m).__name__ in BLOCK_TYPES and id(m) not in in_steps)
        if fused:
            out.append(decoder)
    return list(dict.fromkeys(out))


def decoder_scheme(model: nn.Module, modules: Sequence[nn.Module]) -> str:
    """How the U-Net decoders among ``modules`` are checkpointed, for the map's record ('' : none found)."""
    listed = {id(m) for m in modules}
    notes = []
    for net in model.modules():
        encoder, decoder = getattr(net, "encoder", None), getattr(net, "decoder", None)
        if encoder is None or decoder is None or not hasattr(encoder, "strides"):
            continue
        if id(decoder) in listed:
            last = last_stage_refusal(decoder, _ours)
            notes.append("fused steps: each decoder stage's up-sampling and skip concat are recomputed inside "
                         "its checkpoint (the concatenation is not stored); "
                         + ("the last stage without recomputation, its normalisations differentiated from their "
                            "outputs (in-place activated; under autocast or half precision recomputed in one step)"
                            if last is None else
                            f"the last stage's first block recomputed in one step ({last})"))
        else:
            notes.append("per stage (the concatenated input of each decoder stage is stored): "
                         + (decoder_refusal(decoder, _ours) or "the decoder was not among the segments"))
    return "; ".join(dict.fromkeys(notes))


def _stage_sizes(encoder: nn.Module) -> list[float]:
    """Feature-map size of each encoder level per input voxel: channels / product of strides so far."""
    sizes, scale = [], 1.0
    for channels, stride in zip(encoder.output_channels, encoder.strides):
        stride = stride if isinstance(stride, (list, tuple)) else [stride]
        for s in stride:
            scale *= float(s)
        sizes.append(float(channels) / scale)
    return sizes


def segments_of(model: nn.Module) -> list[nn.Module]:
    """The model's own choice (``checkpoint_segments()``), else :func:`unet_segments`."""
    own = getattr(model, "checkpoint_segments", None)
    return list(own()) if callable(own) else unet_segments(model)


@contextlib.contextmanager
def method_checkpointing(spec: Any, model: nn.Module, setting: str = "auto") -> Iterator[CheckpointUse]:
    """Checkpointing for one run of method ``spec`` on ``model`` as ``execution.checkpointing`` says.

    ``auto``: on for a model that names its own segments (the nnU-Net pipeline), off otherwise;
    ``on``: on wherever known blocks are found (refused with one line where none are); ``off``: never.
    A method that is not :attr:`~esegeta_engine.methods.registry.MethodSpec.recomputable` never runs
    checkpointed. The yielded :class:`CheckpointUse` is filled in as the run goes.
    """
    if setting not in SETTINGS:
        raise ConfigError(f"execution.checkpointing {setting!r} is unknown", f"use one of {', '.join(SETTINGS)}")
    use = CheckpointUse(setting)
    if setting == "off":
        use.why = "off (execution.checkpointing: off)"
        yield use
        return
    if not getattr(spec, "recomputable", False):
        if wrapped_blocks(model):  # another run's checkpointing is still on these blocks
            raise MethodError(f"{getattr(spec, 'name', 'this method')} cannot run now: another run still has "
                              "activation checkpointing on this model's blocks and the method's hooks would "
                              "fire again when a block is recomputed",
                              "wait for the other run to finish (or cancel it), then run this method again")
        use.why = "off: the method's module hooks would fire again when a block is recomputed"
        yield use
        return
    declared = callable(getattr(model, "checkpoint_segments", None))
    if setting == "auto" and not declared:
        use.why = "off (auto: only models that name their blocks, such as the nnU-Net pipeline)"
        yield use
        return
    modules = segments_of(model)
    if not modules:
        raise ConfigError("execution.checkpointing: on, but the engine knows no blocks of this model to checkpoint "
                          "(it knows nnU-Net's PlainConvUNet and ResidualEncoderUNet)",
                          "use execution.checkpointing: auto or off")
    use.segments = len(modules)
    use.decoder = decoder_scheme(model, modules)
    use.why = f"{setting}: blocks keep only their inputs; each is recomputed in the backward"
    with checkpointed(modules) as counter:
        try:
            yield use
        finally:
            use.calls = counter.calls
