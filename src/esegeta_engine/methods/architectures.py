"""What a network's structure says about the inputs it takes (messages that name the fix).

Vision transformers such as MONAI's UNETR embed a fixed grid of patches with learnt position
embeddings: they take exactly one input size, their ``img_size``. A volume of any other size is
explained with a sliding window of that patch size, not by changing channels or padding.
"""

from __future__ import annotations

from torch import nn


def fixed_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """The one spatial input size ``model`` takes, when its structure fixes it; else ``None``.

    Recognised: an ``img_size`` attribute on the model or a submodule, and MONAI's UNETR
    (``patch_size`` times ``feat_size``).
    """
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
            return tuple(size)
        patch, feat = getattr(m, "patch_size", None), getattr(m, "feat_size", None)
        if (isinstance(patch, (tuple, list)) and isinstance(feat, (tuple, list)) and len(patch) == len(feat)
                and all(isinstance(v, int) for v in (*patch, *feat))):
            return tuple(int(p) * int(f) for p, f in zip(patch, feat))
    return None


def fixed_size_fix(model: nn.Module, spatial: tuple[int, ...]) -> str | None:
    """The fix for an input the network cannot take because it takes one size only."""
    size = fixed_input_size(model)
    if size is None or tuple(spatial) == size:
        return None
    return (f"this network takes exactly {list(size)} voxels (its img_size): run it with a sliding window "
            f"of that patch size (execution.patch_size: {list(size)}; CLI --patch-size "
            f"{' '.join(map(str, size))})")
