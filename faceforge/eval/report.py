"""Reports of evaluation results: ROC plots, score histograms and Markdown tables.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work on
headless machines and inside other programs without side effects.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from faceforge.eval.metrics import check_pairs
from faceforge.core.fileio import write_bytes

FPR_RANGE = (1e-4, 1.0)


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Render ``fig`` on the Agg canvas (no pyplot) and write it to ``path`` (folders made), tight bounds."""
    path = Path(path)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()  # rendered in memory, then one atomic write that never follows a link at `path`
    fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches="tight")
    return write_bytes(path, buffer.getvalue())


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``points`` ROC points for drawing: at log-spaced FPRs, the last (highest-TPR) point
    at or below each, plus both ends. A 15.6M-point IJB-C curve draws in milliseconds, not minutes."""
    if len(fpr) <= points:
        return fpr, tpr
    positive = fpr[fpr > 0]
    levels = np.geomspace(positive.min() if positive.size else 1e-12, 1.0, points)
    keep = np.unique(np.concatenate(([0], np.searchsorted(fpr, levels, side="right") - 1, [len(fpr) - 1])))
    return fpr[keep], tpr[keep]


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "ROC",
    dpi: int = 150,
    fpr_range: tuple[float, float] = FPR_RANGE,
    max_points: int = 5000,
) -> Path:
    """One ROC line per model: log-scale FPR (default 1e-4 to 1) against TPR, with a legend.

    Args:
        curves: ``{label: (fpr, tpr)}``, e.g. the first two outputs of :func:`metrics.roc`.
        path: output image; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        title: plot title.
        fpr_range: the FPR axis, e.g. ``(1e-6, 1)`` for IJB-B/C.
        max_points: longer curves are thinned to about this many points (log-spaced in FPR).

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("curves is empty; expected {label: (fpr, tpr)}")
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve {label!r}: fpr and tpr must be 1-D of one length, got {fpr.shape}, {tpr.shape}")
        fpr, tpr = _thin(fpr, tpr, max_points)
        keep = fpr > 0  # log axis: the (0, 0) start point cannot be drawn
        ax.plot(fpr[keep], tpr[keep], label=label, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(*fpr_range)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right")
    return save_figure(fig, path, dpi)


def plot_error_versus_reject(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str = "Error versus reject",
    dpi: int = 150,
) -> Path:
    """Error-versus-reject curves (``faceforge.eval.quality``), drawn beside the ROC plot: the fraction of genuine
    pairs rejected (lowest quality first) against the FNMR at a threshold fixed before rejection, one solid line per
    ``label`` and its random-rejection level dashed in the same colour.

    Args:
        curves: ``{label: (rejected fractions (F,), FNMR (F,), random rejection's FNMR)}``.
        path: output image (the suffix picks the format).

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("curves is empty; expected {label: (fractions, fnmr, random fnmr)}")
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for label, (fractions, fnmr, random_fnmr) in curves.items():
        x, y = 100 * np.asarray(fractions, dtype=np.float64), np.asarray(fnmr, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"curve {label!r}: fractions and fnmr must be 1-D of one length, got {x.shape}, {y.shape}")
        (line,) = ax.plot(x, y, label=label, linewidth=1.5)
        ax.plot(x[[0, -1]], [random_fnmr, random_fnmr], linestyle="--", linewidth=1.0, color=line.get_color())
    ax.set_xlabel("Genuine pairs rejected, lowest quality first (%)")
    ax.set_ylabel("FNMR at a threshold fixed before rejection")
    ax.set_ylim(bottom=0.0)
    ax.set_title(title + " (dashed: random rejection)")
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path, dpi)


def score_histogram(
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[bool],
    path: str | Path,
    bins: int = 100,
    title: str = "Pair score distribution",
    dpi: int = 150,
) -> Path:
    """Histograms of positive and negative pair scores (cosines), as in ArcFace's Fig. 7.

    Args:
        scores: ``(N,)`` pair similarities. labels: ``(N,)`` 1 = same identity.
        path: output image. bins: histogram bins over the score range (default 100).

    Returns:
        The written path.
    """
    s, y = check_pairs(scores, labels)
    edges = np.linspace(s.min(), s.max(), bins + 1) if s.max() > s.min() else bins
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(s[y], bins=edges, density=True, alpha=0.6, label=f"positive pairs ({int(y.sum())})")
    ax.hist(s[~y], bins=edges, density=True, alpha=0.6, label=f"negative pairs ({int((~y).sum())})")
    ax.set_xlabel("Cosine similarity")
    ax.set_ylabel("Density")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path, dpi)


def _format_cell(value: object, percent: bool, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)) and not percent:
        return str(int(value))
    if isinstance(value, (float, int, np.floating, np.integer)):
        return f"{100 * float(value):.{digits}f}" if percent else f"{float(value):.{digits + 2}g}"
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str],
    percent: Collection[str] = (),
    digits: int = 2,
) -> str:
    """A Markdown table with padded, aligned columns.

    Formatting: a column named in ``percent`` shows ``100 * value`` with ``digits`` decimals (0.99833
    -> ``99.83``); other floats use ``digits + 2`` significant digits; ints and strings as they are; a
    missing key or ``None`` is an empty cell. Numeric columns are right-aligned, others left-aligned.

    Args:
        rows: one mapping per table row, e.g. ``[{"model": "r50", "lfw": 0.9983}]``.
        columns: the keys to show, in order (also the header).
        percent: the columns to show as percentages.
        digits: decimals of percentages (default 2).

    Returns:
        The table, lines joined by newlines, with no trailing newline.
    """
    if not columns:
        raise ValueError("columns is empty; expected the keys to show")
    unknown = set(percent) - set(columns)
    if unknown:
        raise ValueError(f"percent names columns not in the table: {sorted(unknown)}; columns are {list(columns)}")
    cells = [[_format_cell(row.get(c), c in percent, digits) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), (int, float, np.number)) for row in rows if row.get(c) is not None)
        and any(row.get(c) is not None for row in rows)
        for c in columns
    ]
    widths = [max([len(c), 3] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(columns), rule] + [line(r) for r in cells])


UNRESOLVED = "—"  # a TAR@FAR the pairs cannot resolve, as IJB tables show it


def far_resolved(far: float, negatives: int) -> bool:
    """Whether ``negatives`` negative pairs resolve FAR ``far``: one false accept is at most ``far`` of them,
    i.e. ``negatives >= 1 / far`` (10,000 for 1e-4). Below it TAR@FAR is TAR at zero false accepts, not at FAR."""
    return negatives * far >= 1 - 1e-9  # 1e-9: 1 / far is not exact in binary (1e-4 * 10_000 may round below 1)


def unresolved_note(far: float, negatives: int, where: str, what: str = "TAR@FAR") -> str:
    """The footnote of an unresolved TAR@FAR cell (:data:`UNRESOLVED`); ``what`` names the rate (e.g. "FMR")."""
    return (f"{UNRESOLVED} {what}={far:.0e} on {where}: needs at least {math.ceil(1 / far - 1e-9):,} negative pairs "
            f"(one false accept in 1/FAR), there are {negatives:,}")


def tar_cells(tar_at_far: Mapping[float, float], negatives: int, where: str,
              fmt: Callable[[float], object] = lambda tar: tar, suffix: str = "") -> tuple[dict[str, object], list[str]]:
    """``({"TAR@FAR=1e-04<suffix>": cell}, notes)``: ``fmt(tar)`` where ``negatives`` resolve the FAR, else
    :data:`UNRESOLVED` and a footnote line (:func:`unresolved_note`) saying why."""
    cells: dict[str, object] = {}
    notes = []
    for far, tar in tar_at_far.items():
        if far_resolved(far, negatives):
            cells[f"TAR@FAR={far:.0e}{suffix}"] = fmt(tar)
        else:
            cells[f"TAR@FAR={far:.0e}{suffix}"] = UNRESOLVED
            notes.append(unresolved_note(far, negatives, where))
    return cells, notes


_TAR_METRIC = re.compile(r"^tar@far=(.+)$")


def metrics_table(metrics: Mapping[str, float], digits: int = 4) -> str:
    """Flat metrics ``{"<set>/<metric>": value}`` (as training logs them) as a small Markdown table, one row per
    set (the part before the last ``/``; "" for unprefixed ones) and one column per metric, in first-seen order.

    A ``tar@far=F`` value of a set whose ``negative_pairs`` are fewer than ``1 / F`` shows :data:`UNRESOLVED`,
    with a footnote line under the table (:func:`unresolved_note`)."""
    rows: dict[str, dict[str, object]] = {}
    columns: list[str] = []
    for key, value in metrics.items():
        where, _, metric = key.rpartition("/")
        rows.setdefault(where, {"set": where or "held-out"})[metric] = value
        if metric not in columns:
            columns.append(metric)
    notes = []
    for row in rows.values():
        negatives = row.get("negative_pairs")
        for metric in list(row):
            match = _TAR_METRIC.match(metric)
            if match and negatives is not None and not far_resolved(float(match.group(1)), int(negatives)):
                row[metric] = UNRESOLVED
                notes.append(unresolved_note(float(match.group(1)), int(negatives), str(row["set"])))
    table = markdown_table(list(rows.values()), ["set", *columns], digits=digits)
    return "\n".join([table, *([""] + notes if notes else [])])


__all__ = ["UNRESOLVED", "far_resolved", "markdown_table", "metrics_table", "plot_error_versus_reject", "plot_roc", "save_figure",
           "score_histogram", "tar_cells", "unresolved_note"]
