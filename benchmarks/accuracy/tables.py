"""The harness's report: mean ± std over seeds as Markdown tables, every run as JSON, plots as PNG.

Per (experiment, dataset) one table: a row per variant with the experiment's columns (by default the
held-out 10-fold accuracy, TAR at FAR 1e-3 and 1e-4, EER and Recall@1; BroadFace Table 5: Recall@1/10/20/30),
mean ± sample std over seeds in %, and the paired difference in the first column against the first variant
(mean ± std over seeds of the per-seed difference: every variant of a seed shares data, initialisation and
test pairs, so this is the sharper test of whether two heads differ). Plots: bars or lines over ``x``,
learning curves, and BroadFace's queue cosine error (Fig. 5a) for runs that logged diagnostics.

Plots use matplotlib's Agg canvas directly (no pyplot), like ``faceforge.eval.report``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from faceforge.eval.report import markdown_table, save_figure
from faceforge.core.fileio import atomic_open

# metric key -> column title
METRICS = {
    "accuracy": "10-fold acc.",
    "tar@far=1e-03": "TAR@FAR=1e-3",
    "tar@far=1e-04": "TAR@FAR=1e-4",
    "eer": "EER",
    "recall@1": "Recall@1",
    "recall@10": "Recall@10",
    "recall@20": "Recall@20",
    "recall@30": "Recall@30",
    "fixed_threshold_accuracy": "acc. at learned threshold",
}
# The gallery scored again (harness.execute: "<prefix>/<metric>"): with AttFC's momentum class encoder, with
# one side of every pair masked (BigFace's MFR protocol), and with one side degraded (``--degraded``)
METRICS.update({f"{prefix}/{key}": f"{title} ({what})" for prefix, what in (("momentum", "momentum enc."),
                ("masked", "masked"), ("degraded", "degraded")) for key, title in list(METRICS.items())})
# Columns a table gains when any of its runs has the metric (SphereFace2's learned threshold, the degraded pairs).
OPTIONAL_METRICS = ("fixed_threshold_accuracy", "degraded/accuracy", "degraded/tar@far=1e-03")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _cell(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def group(done: Sequence[tuple[Any, dict[str, Any] | None]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(experiment, dataset): [variant row]}``; a row has the variant, and ``records`` by seed (None =
    skipped or unfinished), in plan order."""
    tables: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for run, record in done:
        rows = tables.setdefault((run.experiment, run.dataset), {})
        row = rows.setdefault(run.variant.label, {"variant": run.variant, "records": {}})
        row["records"][run.seed] = record
    return {k: list(v.values()) for k, v in tables.items()}


def _finished(row: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {seed: r for seed, r in row["records"].items() if r is not None}


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """The Markdown table of one (experiment, dataset): ``columns`` (metric keys) plus the optional ones
    some run has, and the paired difference of the first column against the first variant."""
    base = _finished(rows[0]) if rows else {}
    base_label = rows[0]["variant"].label if rows else ""
    records = [r for row in rows for r in _finished(row).values()]
    keys = [*columns, *(k for k in OPTIONAL_METRICS if k not in columns and any(k in r["metrics"] for r in records))]
    first = keys[0]
    delta = f"Δ {METRICS[first]} vs {base_label}" if first != "accuracy" else f"Δ acc. vs {base_label}"
    lines = []
    for row in rows:
        done = _finished(row)
        line: dict[str, Any] = {"variant": row["variant"].label, "seeds": len(done)}
        if done:
            for key in keys:
                values = [r["metrics"][key] for r in done.values() if key in r["metrics"]]
                line[METRICS[key]] = _cell(values) if values else "-"
            shared = sorted(set(done) & set(base))
            if row is not rows[0] and shared:
                line[delta] = _cell([done[s]["metrics"][first] - base[s]["metrics"][first] for s in shared])
            line["train s"] = f"{np.mean([r['train_seconds'] for r in done.values()]):.0f}"
        else:
            line[METRICS[first]] = "not run"
        lines.append(line)
    return markdown_table(lines, ["variant", "seeds", *(METRICS[k] for k in keys), delta, "train s"])


def power_law(rows: list[dict[str, Any]], key: str = "accuracy") -> tuple[float, float, float] | None:
    """Fit error = a x^-b by least squares on log error against log x over the variants' seed means, where
    error = 1 - ``key`` (for accuracy / TAR) or ``key`` itself (EER) and x is the variant's ``x`` (parameters
    in millions). Returns (a, b, R²), or None with fewer than 3 finished variants."""
    points = [(row["variant"].x, np.mean([r["metrics"][key] for r in _finished(row).values()]))
              for row in rows if _finished(row) and row["variant"].x is not None]
    if len(points) < 3:
        return None
    x = np.log([p for p, _ in points])
    err = np.array([v if key == "eer" else 1.0 - v for _, v in points])
    y = np.log(err)
    slope, intercept = np.polyfit(x, y, 1)
    fitted = intercept + slope * x
    r2 = 1.0 - float(((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum()) if len(set(y)) > 1 else 1.0
    return float(np.exp(intercept)), float(-slope), r2


def power_law_lines(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """One line per metric: the fitted power law of its error against parameters (BigFace's scaling claim)."""
    lines = []
    for key in keys:
        fit = power_law(rows, key)
        if fit is not None:
            a, b, r2 = fit
            what = METRICS[key] if key == "eer" else f"1 - {METRICS[key]}"
            lines.append(f"Power law: {what} = {a:.4f} x (parameters / 1M)^{-b:+.3f} (R² {r2:.2f}).")
    return lines


def separation(rows: list[dict[str, Any]], key: str = "accuracy") -> str:
    """One line: the spread of the variants' mean ``key`` against the typical seed-to-seed std."""
    accs = [[r["metrics"][key] for r in _finished(row).values()] for row in rows]
    means = [np.mean(a) for a in accs if a]
    stds = [_mean_std(a)[1] for a in accs if len(a) > 1]
    if len(means) < 2:
        return ""
    name = "accuracy" if key == "accuracy" else METRICS[key]
    spread = f"Spread of the variants' mean {name}: {100 * (max(means) - min(means)):.2f} points"
    if not stds:
        return spread + " (one seed: no seed-to-seed std)."
    return f"{spread}; seed-to-seed std, averaged over the variants with 2+ seeds: {100 * np.mean(stds):.2f} points."


# --------------------------------------------------------------------------------------------------
# Plots


DPI = 120


def _values(row: dict[str, Any], key: str) -> list[float]:
    """``key`` in % over the row's finished seeds that recorded it (a run shared with an experiment that does
    not score masked pairs has no ``masked/`` metrics)."""
    return [100 * r["metrics"][key] for r in _finished(row).values() if key in r["metrics"]]


def plot_bars(rows: list[dict[str, Any]], title: str, path: Path, keys: Sequence[str] = ("accuracy", "tar@far=1e-03")) -> Path:
    """Two metrics (default 10-fold accuracy and TAR@FAR=1e-3) per variant, mean with std error bars."""
    fig = Figure(figsize=(4 + 0.9 * len(rows), 4), layout="constrained")
    for i, key in enumerate(keys[:2]):
        ax = fig.add_subplot(1, 2, i + 1)
        shown = [r for r in rows if _values(r, key)]
        stats = [_mean_std(_values(r, key)) for r in shown]
        ax.bar(range(len(shown)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="C0")
        ax.set_xticks(range(len(shown)), [r["variant"].label for r in shown], rotation=30, ha="right")
        low = min(m - s for m, s in stats)
        ax.set_ylim(max(0.0, low - 0.15 * (100 - low) - 1), 100)
        ax.set_ylabel(f"{METRICS[key]} (%)")
        ax.grid(True, axis="y", linestyle=":", linewidth=0.5)
    fig.suptitle(title)
    return save_figure(fig, path, DPI)


def plot_lines(rows: list[dict[str, Any]], title: str, x_label: str, path: Path,
               keys: Sequence[str] = ("accuracy", "tar@far=1e-03")) -> Path:
    """One line per series over the variants' ``x`` (e.g. label-noise level), mean with std error bars; a
    variant without ``x`` (a baseline) is a horizontal dashed line with its std as a band. x spanning a
    factor of 8 or more (queue sizes) is drawn on a log2 axis."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    finished = [row for row in rows if _finished(row)]
    xs = [row["variant"].x for row in finished if row["variant"].x is not None]
    for i, key in enumerate(keys[:2]):
        ax = fig.add_subplot(1, 2, i + 1)
        series: dict[str, list[dict[str, Any]]] = {}
        for row in (r for r in finished if _values(r, key)):
            if row["variant"].x is None:
                mean, std = _mean_std(_values(row, key))
                line = ax.axhline(mean, linestyle="--", color="k", label=row["variant"].label)
                ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.1)
            else:
                series.setdefault(row["variant"].series or row["variant"].label, []).append(row)
        for name, members in series.items():
            members.sort(key=lambda r: r["variant"].x)
            stats = [_mean_std(_values(r, key)) for r in members]
            ax.errorbar([r["variant"].x for r in members], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=name)
        if xs and min(xs) > 0 and max(xs) >= 8 * min(xs):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{METRICS[key]} (%)")
        ax.grid(True, linestyle=":", linewidth=0.5)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path, DPI)


def _mean_series(series: list[list[dict[str, float]]], key: str) -> tuple[list[float], np.ndarray]:
    """The steps every seed's series has, and ``key`` at those steps, ``(seeds, steps)``."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in series)))
    return steps, np.array([[next(p[key] for p in c if p["step"] == s) for s in steps] for c in series])


def plot_diagnostics(rows: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """BroadFace Fig. 5a: the mean cosine error (1 - cos) between queued and current embeddings against
    steps, without (left) and with (right) Eq. 7's compensation, mean over seeds, one line per variant."""
    drawn = [(row, [r["diagnostics"] for r in _finished(row).values() if r.get("diagnostics")]) for row in rows]
    drawn = [(row, series) for row, series in drawn if series]
    if not drawn:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = [fig.add_subplot(1, 2, 1)]
    axes.append(fig.add_subplot(1, 2, 2, sharey=axes[0]))
    for ax, key, name in zip(axes, ("cos_error", "cos_error_compensated"), ("queued e-", "compensated e* (Eq. 7)")):
        for row, series in drawn:
            steps, values = _mean_series(series, key)
            ax.plot(steps, values.mean(0), marker=".", label=row["variant"].label)
        ax.set_title(f"{name} vs current e")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("mean 1 - cos")
        ax.grid(True, linestyle=":", linewidth=0.5)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path, DPI)


def plot_curves(rows: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """The trainer's periodic verification accuracy against steps, mean over seeds, one line per variant."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for row in rows:
        curves = [r["curve"] for r in _finished(row).values() if r.get("curve")]
        if not curves:
            continue
        steps, acc = _mean_series(curves, "accuracy")
        acc = acc * 100
        ax.errorbar(steps, acc.mean(0), yerr=acc.std(0, ddof=1) if len(acc) > 1 else None, marker=".", capsize=2,
                    label=row["variant"].label)
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("10-fold accuracy, trainer's pairs (%)")
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path, DPI)


# --------------------------------------------------------------------------------------------------
# The report


def write_report(done: Sequence[tuple[Any, dict[str, Any] | None]], out: Path, size: str) -> list[Path]:
    """``report.md``, ``results.json`` and ``plots/`` under ``out``; returns the written paths."""
    import experiments as ex

    written = []
    records = [
        {"experiment": run.experiment, "dataset": run.dataset, "variant": run.variant.label,
         "series": run.variant.series, "x": run.variant.x, "seed": run.seed, "key": run.key,
         "status": "done" if record is not None else "not run", **(record or {})}
        for run, record in done
    ]
    with atomic_open(out / "results.json", "w") as f:
        json.dump(records, f, indent=1)
    written.append(out / "results.json")
    lines = [f"# Accuracy harness: size {size}", ""]
    for (name, dataset), rows in group(done).items():
        exp = ex.EXPERIMENTS[name]
        seeds = max((len(row["records"]) for row in rows), default=0)
        lines += [f"## {exp.title}: {dataset}", "",
                  f"Held-out verification, mean ± std over {seeds} seed(s), in %.", ""]
        if exp.notes:
            lines += [exp.notes, ""]
        lines += [table(rows, exp.columns), ""]
        sep = separation(rows, exp.columns[0])
        if sep:
            lines += [sep, ""]
        if exp.power_law:
            lines += [*power_law_lines(rows, ("accuracy", "tar@far=1e-03", "eer")), ""]
        stem = f"{name}_{dataset}"
        if any(_finished(r) for r in rows):
            title = f"{exp.title} ({dataset})"
            if any(r["variant"].x is not None for r in rows):
                plot = plot_lines(rows, title, exp.x_label, out / "plots" / f"{stem}.png", exp.columns)
            else:
                plot = plot_bars(rows, title, out / "plots" / f"{stem}.png", exp.columns)
            written.append(plot)
            lines += [f"![{stem}](plots/{plot.name})", ""]
            extra = (("learning curve", plot_curves(rows, title, out / "plots" / f"{stem}_curve.png")),
                     ("queue cosine error", plot_diagnostics(rows, title, out / "plots" / f"{stem}_diagnostics.png")))
            for what, path in extra:
                if path is not None:
                    written.append(path)
                    lines += [f"![{stem} {what}](plots/{path.name})", ""]
    with atomic_open(out / "report.md", "w") as f:
        f.write("\n".join(lines))
    written.append(out / "report.md")
    return written
