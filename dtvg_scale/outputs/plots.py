"""Pictures of a Stage-II group trace (``group_trace.jsonl``), as PNG files.

- ``group_trace_heatmap``: sources (rows) x steps (columns); the colour is each source's
  similarity to the target at that step, and the cells where the source was in the group are
  marked (a dot when the cells are large; on dense grids a dark band along the bottom of the
  row, grey when a column of several steps had the source in the group part of the time).
- ``similarity_over_time``: one line per source (bold where the source is in the group), and
  the group size and the number of candidates below.

Both read the trace through ``group_trace.read_trace`` (the schema is there), tolerate a
missing, empty or half-written trace (an empty one gives a PNG saying "no trace") and return
the PNG's path. Long traces are binned so that there are at most
as many columns (heatmap) or points (lines) as pixels. Matplotlib is used through ``Figure``
objects and the Agg canvas only: no pyplot, no display, no global backend switch, so this is
safe in a training process or a thread. The image size is fixed by ``WIDTH_IN`` x ``DPI``
(1200 px wide) and, for the heatmap, grows with the number of sources.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dtvg_scale.outputs.group_trace import Trace, read_trace

DPI = 100
WIDTH_IN = 12.0
LINES_HEIGHT_IN = 7.5
EMPTY_HEIGHT_IN = 3.0
MAX_LINE_POINTS = 500
DOT_MIN_CELL_PX = 7.0
FEW_SOURCES = 12
GAP_COLOR = "#d9d9d9"


# -- binning: at most `max_cols` columns, by step value (gaps in the steps stay gaps)
def _columns(steps: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Column edges (in steps) and the column of every trace row."""
    n = len(steps)
    if n <= max_cols:
        if n == 1:
            edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
        else:
            mids = (steps[:-1] + steps[1:]) / 2.0
            edges = np.concatenate([[steps[0] - (mids[0] - steps[0])], mids,
                                    [steps[-1] + (steps[-1] - mids[-1])]])
        return edges, np.arange(n)
    edges = np.linspace(steps[0] - 0.5, steps[-1] + 0.5, max_cols + 1)
    column = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, max_cols - 1)
    return edges, column


def _bin_mean(values: np.ndarray, column: np.ndarray, n_cols: int) -> np.ndarray:
    """Mean over the trace rows of each column, ignoring NaN; NaN where a column is empty.
    ``values`` is [T] or [S, T]."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    finite = np.isfinite(values)
    total = np.zeros((values.shape[0], n_cols))
    count = np.zeros((values.shape[0], n_cols))
    np.add.at(total.T, column, np.where(finite, values, 0.0).T)
    np.add.at(count.T, column, finite.T.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")
    os.replace(tmp, out_png)  # a reader (or an artifact upload) never sees half a file
    return out_png


def _no_trace(trace_path: Path, out_png: Path, what: str) -> Path:
    fig = Figure(figsize=(WIDTH_IN, EMPTY_HEIGHT_IN), dpi=DPI)
    fig.text(0.5, 0.58, "no trace", ha="center", va="center", fontsize=28, color="#555555")
    fig.text(0.5, 0.32, f"{what}: {trace_path} has no rows", ha="center", va="center", fontsize=11,
             color="#555555")
    return _save(fig, out_png)


def _title(trace_path: Path) -> str:
    path = Path(trace_path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _steps_text(trace: Trace) -> str:
    n = len(trace.steps)
    return f"1 step ({trace.steps[0]})" if n == 1 else f"{n} steps {trace.steps[0]}-{trace.steps[-1]}"


def _row_means(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite values; -inf for a row with none (sorted last)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    total = np.where(finite, values, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), -np.inf)


def _symmetric_limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    limit = float(np.percentile(finite, 99.5))
    return limit if limit > 0 else (float(finite.max()) or 1.0)


def group_trace_heatmap(trace_path: Path, out_png: Path) -> Path:
    """Sources x steps, coloured by similarity to the target, group membership marked."""
    trace = read_trace(trace_path)
    n_src, n_steps = len(trace.sources), len(trace.steps)
    if n_src == 0 or n_steps == 0:
        return _no_trace(trace_path, out_png, "group trace heatmap")

    # rows sorted by mean similarity, most similar on top
    order = np.argsort(-_row_means(trace.similarity), kind="stable")
    names = [trace.sources[i] for i in order]
    sim, sel = trace.similarity[order], trace.selected[order]

    # layout in inches -> pixels, fixed size
    row_in = max(0.12, min(0.3, 8.0 / n_src))
    heat_in = max(2.2, row_in * n_src)
    label_pt = float(np.clip(row_in * 72 * 0.7, 5.5, 10.0))
    longest = max(len(n) for n in names)
    left_in = float(np.clip(0.35 + longest * label_pt * 0.6 / 72, 1.0, 3.6))
    right_in, top_in, gap_in, size_in, bottom_in = 1.25, 1.0, 0.12, 1.0, 0.65
    height_in = top_in + size_in + gap_in + heat_in + bottom_in
    plot_w_in = WIDTH_IN - left_in - right_in
    max_cols = max(1, int(plot_w_in * DPI))
    edges, column = _columns(trace.steps, max_cols)
    n_cols = len(edges) - 1
    binned = n_cols < n_steps
    sim_cols = _bin_mean(sim, column, n_cols)
    frac_cols = _bin_mean(sel.astype(float), column, n_cols)
    size_cols = _bin_mean(trace.group_size, column, n_cols)[0]
    steps_per_col = n_steps / n_cols

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI)

    def box(bottom: float, height: float, left: float = left_in, width: float = plot_w_in):
        return [left / WIDTH_IN, bottom / height_in, width / WIDTH_IN, height / height_in]

    ax = fig.add_axes(box(bottom_in, heat_in))
    ax_size = fig.add_axes(box(bottom_in + heat_in + gap_in, size_in), sharex=ax)
    cax = fig.add_axes(box(bottom_in + heat_in * 0.25, heat_in * 0.5, WIDTH_IN - right_in + 0.2, 0.18))

    limit = _symmetric_limit(sim_cols)
    ax.set_facecolor(GAP_COLOR)  # steps with no row (gaps) stay grey
    y_edges = np.arange(n_src + 1) - 0.5
    mesh = ax.pcolormesh(edges, y_edges, np.ma.masked_invalid(sim_cols), cmap="RdBu_r", vmin=-limit,
                         vmax=limit, shading="flat", rasterized=True)
    ax.set_ylim(n_src - 0.5, -0.5)
    ax.set_xlim(edges[0], edges[-1])
    cbar = fig.colorbar(mesh, cax=cax)
    cbar.set_label("similarity to the target", fontsize=9)
    cbar.ax.tick_params(labelsize=8)

    cell_w = plot_w_in * DPI / n_cols
    cell_h = heat_in * DPI / n_src
    if cell_w >= DOT_MIN_CELL_PX and cell_h >= DOT_MIN_CELL_PX:
        marker = "dot: the source is in the group at that step"
        centres = (edges[:-1] + edges[1:]) / 2
        rows, cols = np.nonzero(frac_cols >= 0.5)
        dot_pt = 0.38 * min(cell_w, cell_h, 28) * 72 / DPI
        ax.scatter(centres[cols], rows, s=dot_pt ** 2, c="black", edgecolors="white",
                   linewidths=max(0.4, dot_pt / 8), zorder=3)
    else:
        marker = ("dark band along the bottom of a row: the source is in the group"
                  + (" (grey: in part of the column's steps)" if binned else ""))
        band = min(0.4, max(0.25, 3.0 / cell_h))  # at least ~3 px, at most 40% of the row
        band_edges = np.empty(2 * n_src + 1)
        band_edges[0::2] = y_edges
        band_edges[1::2] = y_edges[1:] - band
        band_values = np.full((2 * n_src, n_cols), np.nan)
        band_values[1::2] = np.where(frac_cols > 0, frac_cols, np.nan)
        ax.pcolormesh(edges, band_edges, np.ma.masked_invalid(band_values), cmap="Greys", vmin=-0.6,
                      vmax=1.0, shading="flat", rasterized=True, zorder=2)

    if n_src > 1:  # thin white lines between rows: which row a band belongs to
        ax.hlines(y_edges[1:-1], edges[0], edges[-1], colors="white", linewidth=1.0 if cell_h >= 12 else 0.5,
                  zorder=4)
    stride = max(1, math.ceil(7.0 / cell_h))
    ax.set_yticks(range(0, n_src, stride))
    ax.set_yticklabels(names[::stride], fontsize=label_pt)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("step", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    if n_steps == 1:
        ax.set_xticks([int(trace.steps[0])])
    ax.tick_params(axis="x", labelsize=8)

    x_mid = (edges[:-1] + edges[1:]) / 2
    if n_cols == 1:
        ax_size.plot(x_mid, size_cols, "o", color="#333333", markersize=4)
    else:
        ax_size.plot(x_mid, size_cols, color="#333333", linewidth=1.0, drawstyle="steps-mid")
    ax_size.set_ylabel("group size", fontsize=9)
    ax_size.set_ylim(0, max(1.0, np.nanmax(size_cols) if np.isfinite(size_cols).any() else 1.0) * 1.15)
    ax_size.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax_size.tick_params(labelbottom=False, labelsize=8)
    ax_size.grid(axis="y", color="#e5e5e5", linewidth=0.6)

    binning = f"; one column = {steps_per_col:.1f} steps (mean)" if binned else ""
    fig.text(left_in / WIDTH_IN, 1 - 0.28 / height_in,
             f"group trace: {_title(trace_path)}  ({n_src} sources, {_steps_text(trace)})",
             fontsize=12, weight="bold", va="center")
    fig.text(left_in / WIDTH_IN, 1 - 0.58 / height_in,
             f"colour: similarity to the target, rows sorted by mean similarity{binning}\n{marker}",
             fontsize=9, va="center", color="#333333", linespacing=1.4)
    return _save(fig, out_png)


def _spread(values: list[float], min_gap: float, lo: float, hi: float) -> list[float]:
    """Label positions near ``values``, in the same order, at least ``min_gap`` apart and
    inside [lo, hi] when there is room."""
    if not values:
        return []
    order = np.argsort(values, kind="stable")
    placed = np.clip(np.asarray(values, dtype=float)[order], lo, hi)
    n = len(placed)
    for i in range(1, n):  # push up
        placed[i] = max(placed[i], placed[i - 1] + min_gap)
    for i in range(n - 1, -1, -1):  # then down from the top edge
        placed[i] = min(placed[i], hi - (n - 1 - i) * min_gap)
        if i < n - 1:
            placed[i] = min(placed[i], placed[i + 1] - min_gap)
    out = np.empty(n)
    out[order] = placed
    return out.tolist()


def similarity_over_time(trace_path: Path, out_png: Path) -> Path:
    """Each source's similarity to the target against the step (bold where the source is in
    the group), and the group size and candidate count below."""
    trace = read_trace(trace_path)
    n_src, n_steps = len(trace.sources), len(trace.steps)
    if n_src == 0 or n_steps == 0:
        return _no_trace(trace_path, out_png, "similarity over time")

    edges, column = _columns(trace.steps, MAX_LINE_POINTS)
    n_cols = len(edges) - 1
    binned = n_cols < n_steps
    if binned:
        x = (edges[:-1] + edges[1:]) / 2
    else:
        x = trace.steps.astype(float)
    sim = _bin_mean(trace.similarity, column, n_cols)
    frac = _bin_mean(trace.selected.astype(float), column, n_cols)
    size = _bin_mean(trace.group_size, column, n_cols)[0]
    cand = _bin_mean(trace.candidates, column, n_cols)[0]
    order = list(np.argsort(-_row_means(sim), kind="stable"))

    few = n_src <= FEW_SOURCES
    right_in = 2.6 if few else 2.9
    left_in, bottom_in, top_in, gap_in = 0.9, 0.6, 0.75, 0.15
    avail = LINES_HEIGHT_IN - bottom_in - top_in - gap_in
    low_in, high_in = avail * 0.25, avail * 0.75
    plot_w = WIDTH_IN - left_in - right_in
    fig = Figure(figsize=(WIDTH_IN, LINES_HEIGHT_IN), dpi=DPI)

    def box(bottom: float, height: float) -> list[float]:
        return [left_in / WIDTH_IN, bottom / LINES_HEIGHT_IN, plot_w / WIDTH_IN, height / LINES_HEIGHT_IN]

    ax_low = fig.add_axes(box(bottom_in, low_in))
    ax = fig.add_axes(box(bottom_in + low_in + gap_in, high_in), sharex=ax_low)

    single = n_cols == 1
    if few:
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                   "#e377c2", "#17becf", "#7f7f7f", "#bcbd22", "#393b79", "#637939"]
        colors = {i: palette[k % len(palette)] for k, i in enumerate(order)}
        thin, bold, alpha_thin = 1.0, 2.6, 0.45
    else:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        colors = {i: cmap(0.78 * (1 - k / max(1, n_src - 1))) for k, i in enumerate(order)}  # no pale yellow
        thin, bold, alpha_thin = 0.6, 1.6, 0.35
    for k, i in enumerate(order):
        y = sim[i]
        in_group = np.where(frac[i] >= 0.5, y, np.nan)
        ax.plot(x, y, color=colors[i], linewidth=thin, alpha=alpha_thin, zorder=2,
                **({"marker": "o", "markersize": 4} if single else {}))
        # markers on the in-group points while they are far enough apart to be seen (a step in
        # the group between two outside it is a point, not a segment)
        dots = {"marker": "o", "markersize": 4 if few else 2.5} if single or n_cols <= 150 else {}
        ax.plot(x, in_group, color=colors[i], linewidth=bold, alpha=0.95, zorder=3,
                label=trace.sources[i] if few else None, **dots)

    ax.axhline(0.0, color="#999999", linewidth=0.7, zorder=1)
    ax.set_ylabel("similarity to the target", fontsize=10)
    ax.tick_params(labelbottom=False, labelsize=8)
    ax.grid(color="#eeeeee", linewidth=0.6)
    ax.margins(x=0.01)
    if few:
        legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
                           title="source (bold = in group)", title_fontsize=9, handlelength=2.2)
        for handle in legend.legend_handles:
            handle.set_alpha(1.0)
    else:  # name the most and least similar sources at the right edge
        shown = order[:6] + order[-3:] if n_src > 9 else order
        finals = []
        for i in shown:
            finite = np.flatnonzero(np.isfinite(sim[i]))
            finals.append(float(sim[i][finite[-1]]) if finite.size else 0.0)
        lo, hi = ax.get_ylim()
        ys = _spread(finals, (hi - lo) * 0.045, lo + (hi - lo) * 0.02, hi - (hi - lo) * 0.02)
        for i, y_text in zip(shown, ys):
            ax.annotate(trace.sources[i], xy=(1.0, y_text), xycoords=("axes fraction", "data"),
                        xytext=(6, 0), textcoords="offset points", fontsize=8, color=colors[i],
                        va="center", annotation_clip=False)
        ax.text(1.01, 1.02, "most / least similar\n(bold = in group)", transform=ax.transAxes, fontsize=8,
                va="bottom", color="#333333")

    style = {"marker": "o", "markersize": 5} if single else {"drawstyle": "steps-mid"}
    ax_low.plot(x, size, color="#222222", linewidth=1.3, label="group size", **style)
    if np.isfinite(cand).any():
        ax_low.plot(x, cand, color="#888888", linewidth=1.0, linestyle="--", label="candidates", **style)
    top = np.nanmax(np.concatenate([size[np.isfinite(size)], cand[np.isfinite(cand)], [1.0]]))
    ax_low.set_ylim(0, top * 1.15 + 0.2)
    ax_low.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax_low.set_ylabel("sources", fontsize=10)
    ax_low.set_xlabel("step", fontsize=10)
    ax_low.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    if single:
        ax_low.set_xlim(x[0] - 1, x[0] + 1)
        ax_low.set_xticks([x[0]])
    ax_low.tick_params(labelsize=8)
    ax_low.grid(color="#eeeeee", linewidth=0.6)
    ax_low.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)

    binning = f"; points average {n_steps / n_cols:.1f} steps" if binned else ""
    fig.text(left_in / WIDTH_IN, 1 - 0.25 / LINES_HEIGHT_IN,
             f"similarity over time: {_title(trace_path)}  ({n_src} sources, {_steps_text(trace)})",
             fontsize=12, weight="bold", va="center")
    fig.text(left_in / WIDTH_IN, 1 - 0.52 / LINES_HEIGHT_IN,
             f"thin: similarity of every source; bold: while the source is in the group{binning}",
             fontsize=9, va="center", color="#333333")
    return _save(fig, out_png)
