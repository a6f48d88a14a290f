"""Deletion / insertion curves of the evaluated maps, on a small dark matplotlib canvas."""

from __future__ import annotations

from typing import Any

import numpy as np

FG, BG, AX, EDGE = "#d0d0d0", "#262930", "#1e1f24", "#555"


class CurvesCanvas:
    """A canvas with the two faithfulness panels; :meth:`draw` replots every map's curves.

    The legend sits below the panels (one column per map name, names elided in the middle),
    so it never widens the dock.
    """

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        class Canvas(FigureCanvasQTAgg):
            """Draws only while shown: a hidden tab's canvas is resized whenever the dock's layout changes
            (a layer added), and each resize redrew the whole figure, 0.3-1.4 s on the GUI thread (issue 19)."""

            def draw_idle(self) -> None:
                if self.isVisible():
                    super().draw_idle()
                else:
                    self._put_off = True

            def showEvent(self, event: Any) -> None:
                super().showEvent(event)
                if getattr(self, "_put_off", False):
                    self._put_off = False
                    super().draw_idle()

        self.figure = Figure(figsize=(3.6, 2.4), facecolor=BG, layout="constrained")
        self.widget = Canvas(self.figure)
        self.widget.setMinimumHeight(180)
        self.lines_drawn = 0
        self.draw({})

    def draw(self, curves: dict[str, dict[str, Any]]) -> None:
        """Plot ``{map name: curves dict}`` (``fractions``, ``deletion_norm``, ``insertion_norm``)."""
        fig = self.figure
        fig.clear()
        axes = fig.subplots(1, 2, sharey=True)
        self.lines_drawn = 0
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.set_facecolor(AX)
            ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC better)", color=FG, fontsize=7)
            ax.set_xlabel("fraction of voxels", color=FG, fontsize=7)
            ax.tick_params(colors=FG, labelsize=6)
            for spine in ax.spines.values():
                spine.set_color(EDGE)
            for i, (name, c) in enumerate(curves.items()):
                y = np.array([np.nan if v is None else v for v in c[f"{kind}_norm"]], dtype=float)
                ax.plot(c["fractions"], y, color=f"C{i % 10}", lw=1.3, label=elide_middle(name.split(" · ")[0], 22))
                self.lines_drawn += 1
        axes[0].set_ylabel("score / unperturbed", color=FG, fontsize=7)
        if curves:
            fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=6,
                       ncols=min(len(curves), 2), facecolor=BG, labelcolor=FG, edgecolor=EDGE)
        self.widget.draw_idle()


def elide_middle(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters with an ellipsis in the middle (ends kept)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]
