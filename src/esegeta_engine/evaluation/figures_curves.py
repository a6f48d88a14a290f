"""Deletion / insertion curves figure of a report (matplotlib, no pyplot)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _curve_data(c: Any) -> dict[str, Any]:
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    out = {"fractions": np.array(d["fractions"], dtype=float)}
    for kind in ("deletion", "insertion"):
        y = d.get(f"{kind}_norm")
        y = np.array(y if y is not None and any(t is not None for t in y) else d[kind], dtype=float)
        out[kind] = y
        auc = d.get(f"auc_{kind}")
        out[f"auc_{kind}"] = float("nan") if auc is None else float(auc)
    return out


def curves_figure(curves: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Deletion and insertion curves side by side, AUCs in the legends.

    ``curves`` maps a name to a :class:`~esegeta_engine.evaluation.faithfulness.Curves`
    or its ``to_dict()``; names starting with "random" are drawn dashed grey.
    The normalised curves are drawn (the raw ones where those are undefined).

    Returns
    -------
    Path
    """
    from esegeta_engine.evaluation.figures import _figure, _save

    fig = _figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    hints = {"deletion": "lower AUC is better", "insertion": "higher AUC is better"}
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for name, c in curves.items():
            d = _curve_data(c)
            style = {"color": "0.5", "linestyle": "--"} if name.lower().startswith("random") else {}
            ax.plot(d["fractions"], d[kind], marker=".", label=f"{name} (AUC {d[f'auc_{kind}']:.3f})",
                    **style)
        ax.set_title(f"{kind} ({hints[kind]})", fontsize=10)
        ax.set(xlabel="fraction of voxels " + ("removed" if kind == "deletion" else "revealed"),
               ylabel="target score / unperturbed score", xlim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
