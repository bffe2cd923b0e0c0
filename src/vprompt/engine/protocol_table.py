"""Protocol results → tables laid out like the papers' (Markdown, CSV) and a few-shot plot.

Numbers are top-1 accuracy in percent; ``mean ± std`` over seeds with the population standard
deviation (``numpy.std``, as CoOp's ``parse_test_res.py`` reports it). The harmonic mean of
base-to-novel rows is taken of the mean base and mean novel accuracies, as CoCoOp's tables do,
and the *Average* row averages the per-dataset means.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vprompt.utils.io import atomic_path


@dataclass(frozen=True)
class Stat:
    """Mean and population std (in percent) of one cell over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        pct = [100.0 * v for v in values]
        mean = sum(pct) / len(pct)
        std = math.sqrt(sum((v - mean) ** 2 for v in pct) / len(pct))
        return cls(mean, std, len(pct))

    def text(self) -> str:
        return f"{self.mean:.2f}" if self.n == 1 else f"{self.mean:.2f} ± {self.std:.2f}"


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@dataclass(frozen=True)
class Table:
    """A rendered-to-be table: header, rows of cells, and the numbers behind them."""

    title: str
    header: list[str]
    rows: list[list[str]]
    data: dict[str, Any]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return buf.getvalue()


def _shots_label(shots: int | None) -> str:
    if shots is None:
        return "zero-shot"
    return f"{shots} shot" + ("s" if shots != 1 else "")


def _group(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int | None], list[Any]]:
    groups: dict[tuple[str, int | None], list[Any]] = {}
    for rec in records:
        job = rec["job"]
        groups.setdefault((job["dataset"], job["shots"]), []).append(rec["metrics"])
    return groups


def few_shot_table(
    records: Sequence[Mapping[str, Any]], titles: Mapping[str, str], order: Sequence[str]
) -> Table:
    """Rows: datasets then *Average*; columns: shot counts."""
    groups = _group(records)
    shots = sorted({s for _, s in groups}, key=lambda s: -1 if s is None else s)
    datasets = [d for d in order if any(d == g[0] for g in groups)]
    header = ["Dataset"] + [_shots_label(s) for s in shots]
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    per_shot: dict[int | None, list[float]] = {s: [] for s in shots}
    for ds in datasets:
        row = [titles.get(ds, ds)]
        for s in shots:
            metrics = groups.get((ds, s))
            if not metrics:
                row.append("–")
                continue
            stat = Stat.of([m["accuracy"] for m in metrics])
            data.setdefault(ds, {})[_shots_label(s)] = stat.__dict__
            per_shot[s].append(stat.mean)
            row.append(stat.text())
        rows.append(row)
    if len(datasets) > 1:
        average = ["**Average**"]
        for s in shots:
            complete = len(per_shot[s]) == len(datasets)
            mean = sum(per_shot[s]) / len(per_shot[s]) if complete else None
            average.append(f"{mean:.2f}" if mean is not None else "–")
            data.setdefault("average", {})[_shots_label(s)] = mean
        rows.append(average)
    return Table("Few-shot classification (top-1 %)", header, rows, data)


def base_to_novel_table(
    records: Sequence[Mapping[str, Any]], titles: Mapping[str, str], order: Sequence[str]
) -> Table:
    """Rows: *Average* then datasets; columns: Base, Novel, HM (one block per shot count)."""
    groups = _group(records)
    datasets = [d for d in order if any(d == g[0] for g in groups)]
    shots = sorted({s for _, s in groups}, key=lambda s: -1 if s is None else s)
    header = ["Dataset"]
    for s in shots:
        suffix = f" ({_shots_label(s)})" if len(shots) > 1 else ""
        header += [f"Base{suffix}", f"Novel{suffix}", f"HM{suffix}"]
    body: list[list[str]] = []
    data: dict[str, Any] = {}
    sums: dict[int | None, list[tuple[float, float]]] = {s: [] for s in shots}
    for ds in datasets:
        row = [titles.get(ds, ds)]
        for s in shots:
            metrics = groups.get((ds, s))
            if not metrics:
                row += ["–", "–", "–"]
                continue
            base = Stat.of([m["base"] for m in metrics])
            new = Stat.of([m["new"] for m in metrics])
            hm = harmonic_mean(base.mean, new.mean)
            sums[s].append((base.mean, new.mean))
            data.setdefault(ds, {})[_shots_label(s)] = {
                "base": base.__dict__,
                "new": new.__dict__,
                "hm": hm,
            }
            row += [base.text(), new.text(), f"{hm:.2f}"]
        body.append(row)
    rows = body
    if len(datasets) > 1:
        average = ["**Average**"]
        for s in shots:
            if len(sums[s]) != len(datasets):
                average += ["–", "–", "–"]
                continue
            b = sum(x for x, _ in sums[s]) / len(sums[s])
            n = sum(y for _, y in sums[s]) / len(sums[s])
            average += [f"{b:.2f}", f"{n:.2f}", f"{harmonic_mean(b, n):.2f}"]
            data.setdefault("average", {})[_shots_label(s)] = {
                "base": b,
                "new": n,
                "hm": harmonic_mean(b, n),
            }
        rows = [average, *body]
    return Table("Base-to-novel generalization (top-1 %)", header, rows, data)


def transfer_table(
    records: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    *,
    title: str,
    method: str,
) -> Table:
    """Cross-dataset / domain generalization: one row per (source, shots); columns: the source,
    each target, and the targets' *Average*."""
    groups = _group(records)
    targets: list[str] = []
    for metrics in groups.values():
        for m in metrics:
            targets += [t for t in m["targets"] if t not in targets]
    header = ["Method", "Source"] + [titles.get(t, t) for t in targets] + ["Average"]
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    for (source, shots), metrics in ordered:
        src = Stat.of([m["source"] for m in metrics])
        label = f"{method} ({_shots_label(shots)}, {titles.get(source, source)})"
        row = [label, src.text()]
        means = []
        entry: dict[str, Any] = {"source": src.__dict__, "targets": {}}
        for t in targets:
            values = [m["targets"][t] for m in metrics if t in m["targets"]]
            if not values:
                row.append("–")
                continue
            stat = Stat.of(values)
            means.append(stat.mean)
            entry["targets"][t] = stat.__dict__
            row.append(stat.text())
        avg = sum(means) / len(means) if len(means) == len(targets) and means else None
        entry["average"] = avg
        row.append(f"{avg:.2f}" if avg is not None else "–")
        rows.append(row)
        data[f"{source}/{_shots_label(shots)}"] = entry
    return Table(title, header, rows, data)


def plot_few_shot(
    records: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    order: Sequence[str],
    path: Path,
) -> Path | None:
    """Accuracy vs shots per dataset (mean ± std over seeds), CoOp's Figure 3 style."""
    groups = _group(records)
    shot_values = sorted({s for _, s in groups if s is not None})
    if not shot_values:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the few-shot plot", stacklevel=2)
        return None
    datasets = [d for d in order if any(d == g[0] for g in groups)]
    cols = min(4, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, ds in enumerate(datasets, start=1):
        ax = fig.add_subplot(rows, cols, i)
        xs, ms, ss = [], [], []
        for s in shot_values:
            metrics = groups.get((ds, s))
            if metrics:
                stat = Stat.of([m["accuracy"] for m in metrics])
                xs.append(s)
                ms.append(stat.mean)
                ss.append(stat.std)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3)
        zero = groups.get((ds, None))
        if zero:
            ax.axhline(Stat.of([m["accuracy"] for m in zero]).mean, ls="--", c="gray")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shot_values, [str(s) for s in shot_values])
        ax.set_title(titles.get(ds, ds), fontsize=10)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
