"""nnU-Net's U-Net decoder run as checkpointed steps that begin before each stage's up-sampling and skip concat.

Checkpointing a decoder stage as a module stores that stage's input: the concatenation of the
up-sampled lower level and the skip, twice the skip's channels at the skip's resolution. At the
full-resolution level of an 80x160x160 nnU-Net patch that is 64 channels, 524 MB, kept through the
whole backward although both of its halves can be recomputed from tensors that stay alive anyway
(the lower level's output and the skip, which the encoder's next stage stores). No single module
covers "up-sample, concatenate, convolve", so for the length of one run the decoder's forward is
replaced by the same loop made of checkpointed steps whose inputs are ``(lower level, skip)``:

- every stage but the last: one step, ``stage(cat(transpconv(lower), skip))`` (the stage's blocks of
  the large levels are checkpointed again inside it, as before);
- the last stage, where the backward starts: its blocks with an in-place-activated backward that
  recomputes nothing (:mod:`.checkpoint_opening`: each block saves only its output); where that is
  refused (:func:`last_stage_refusal`), one step for the up-sampling, the concat and the first block,
  then each further block on its own, so the concatenation is alive only while the first block's
  backward runs.

Only the exact decoder class the loop was written for is replaced
(:data:`UNET_DECODER`, which both PlainConvUNet and ResidualEncoderUNet use, with
:data:`CONV_STAGE` stages); any other decoder, a subclass included, keeps the per-stage scheme and
the map's record says why (:func:`decoder_refusal`). The loop is written from that class's documented
structure (its docstring and constructor: stages in order of computation, the first taking the
bottleneck; each stage = transposed convolution of the level below, concatenation with the skip
after it, the stage's conv blocks; segmentation heads for every stage under deep supervision,
largest first, else only the last stage's), not copied from it; tests check outputs and gradients
bit-identical to the unwrapped network in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esegeta_engine.forward.checkpoint_opening import block as inplace_block
from esegeta_engine.forward.checkpoint_opening import block_refusal, full_precision, opening, opening_refusal

UNET_DECODER = "dynamic_network_architectures.building_blocks.unet_decoder.UNetDecoder"
"""The decoder class :func:`fused_forward` reproduces (exactly this class, not a subclass)."""
CONV_STAGE = "dynamic_network_architectures.building_blocks.simple_conv_blocks.StackedConvBlocks"
"""Its stages: ``forward(x) = self.convs(x)``, a Sequential of conv blocks."""

Step = Callable[..., torch.Tensor]
"""``step(fn, *tensors)``: ``fn(*tensors)`` run as one checkpointed segment."""


def class_path(m: Any) -> str:
    """``module.QualifiedName`` of ``m``'s exact class."""
    return f"{type(m).__module__}.{type(m).__qualname__}"


def decoder_refusal(decoder: nn.Module, ours: Callable[[Any], bool]) -> str | None:
    """Why ``decoder`` cannot run as fused steps (None: it can).

    ``ours(forward)`` says whether an instance ``forward`` is one of the engine's checkpointing wrappers
    (those may be replaced for the run; a user's own is respected).
    """
    if class_path(decoder) != UNET_DECODER:
        return f"decoder class {class_path(decoder)} is not {UNET_DECODER} (the loop is written for that class only)"
    own = decoder.__dict__.get("forward")
    if own is not None and not ours(own):
        return "the decoder has its own instance forward"
    stages, ups, heads = (list(getattr(decoder, k, [])) for k in ("stages", "transpconvs", "seg_layers"))
    if not stages or not len(stages) == len(ups) == len(heads):
        return "the decoder's stages, transposed convolutions and segmentation heads do not match"
    for stage in stages:
        if class_path(stage) != CONV_STAGE or not isinstance(getattr(stage, "convs", None), nn.Sequential):
            return f"decoder stage class {class_path(stage)} is not {CONV_STAGE}"
        own = stage.__dict__.get("forward")
        if own is not None and not ours(own):
            return "a decoder stage has its own instance forward"
    for part, what in ((stages[-1], "the last decoder stage"), (stages[-1].convs, "the last decoder stage's convs")):
        if part._forward_hooks or part._forward_pre_hooks:  # the loop calls its blocks, not the stage
            return f"{what} has forward hooks (the fused steps call its blocks, not it)"
        own = part.__dict__.get("forward")
        if part is stages[-1].convs and own is not None and not ours(own):
            return f"{what} has its own instance forward"
    return None


def last_stage_refusal(decoder: nn.Module, ours: Callable[[Any], bool] = lambda f: False) -> str | None:
    """Why the last stage cannot run with the in-place-activated backward of :mod:`.checkpoint_opening`."""
    blocks = list(decoder.stages[-1].convs)
    why = opening_refusal(decoder.transpconvs[-1], blocks[0], ours)
    for b in blocks[1:]:
        why = why or block_refusal(b, ours)
    return why


def first_blocks(decoder: nn.Module) -> list[nn.Module]:
    """Blocks :func:`fused_forward` runs itself: the last stage's first block inside a step of its own, or
    every block of the last stage where they run in-place-activated (no recomputation)."""
    convs = list(decoder.stages[-1].convs)
    return convs if last_stage_refusal(decoder) is None else convs[:1]


def fused_forward(decoder: nn.Module, skips: list[torch.Tensor], step: Step,
                  ours: Callable[[Any], bool] = lambda f: False) -> Any:
    """:data:`UNET_DECODER`'s forward on ``skips`` (encoder outputs, bottleneck last), in checkpointed steps.

    Same operations in the same order as the class's own forward (see the module docstring); only the
    checkpoint boundaries are new.
    """
    lower = skips[-1]
    n = len(decoder.stages)
    heads = []
    for s in range(n):
        up, stage = decoder.transpconvs[s], decoder.stages[s]
        if s < n - 1:
            def whole(low: torch.Tensor, skip: torch.Tensor, up: nn.Module = up, stage: nn.Module = stage):
                return stage(torch.cat((up(low), skip), 1))

            x = step(whole, lower, skips[-(s + 2)])
        else:  # the backward starts here: the concat is kept for the first block's backward only
            first, rest = stage.convs[0], stage.convs[1:]

            if last_stage_refusal(decoder, ours) is None and full_precision(lower):  # not under autocast
                x = opening(up, first, lower, skips[-(s + 2)])  # no recomputation: the backward needs outputs only
                for b in rest:
                    x = inplace_block(b, x)
            else:
                def whole_first(low: torch.Tensor, skip: torch.Tensor, up: nn.Module = up, first: nn.Module = first):
                    return first(torch.cat((up(low), skip), 1))

                x = rest(step(whole_first, lower, skips[-(s + 2)]))
        if decoder.deep_supervision:
            heads.append(decoder.seg_layers[s](x))
        elif s == n - 1:
            heads.append(decoder.seg_layers[-1](x))
        lower = x
    heads = heads[::-1]  # the largest resolution first
    return heads if decoder.deep_supervision else heads[0]
