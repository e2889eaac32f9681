"""A matplotlib figure as PNG bytes, rendered with the Agg canvas (no pyplot state): the evaluation's plots and the
fit's failure-table plot. Callers write the bytes atomically, so a plot is never half-written."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figure_png(fig: Figure) -> bytes:
    """``fig`` rendered to PNG at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
