"""A defence report as files: ``defend.json``, ``defend.md`` and a bar chart ``defend.png``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from vprompt.defend.evaluate import DefenseReport
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_path, atomic_write_text


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pt"


def _setting(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(report: DefenseReport) -> list[tuple[str, float | None, float | None]]:
    """(measure, accuracy without the defence, accuracy with it) for every measured row."""
    out: list[tuple[str, float | None, float | None]] = [
        ("clean", report.clean_accuracy, report.clean_accuracy_defended)
    ]
    if report.patched_accuracy_random is not None:
        out.append(
            (
                f"patch, {report.placements} random placements",
                report.patched_accuracy_random,
                report.patched_accuracy_random_defended,
            )
        )
        out.append(
            (
                f"patch, worst of {report.grid}x{report.grid} positions",
                report.patched_accuracy_worst,
                report.patched_accuracy_worst_defended,
            )
        )
    if report.certified_accuracy is not None:
        out.append(("certified robust (clean images)", None, report.certified_accuracy))
    return out


def markdown_table(report: DefenseReport) -> str:
    """The report as a markdown table: accuracy without / with the defence and the change."""
    lines = [
        f"# Defence: {report.defense}",
        "",
        f"{report.images} test images. Clean cost (accuracy lost to the defence): "
        f"{100 * report.clean_cost + 0.0:.1f} pt.",
        "",
        f"| accuracy | no defence | {report.defense} | change |",
        "|---|---|---|---|",
    ]
    for name, plain, defended in rows(report):
        change = None if plain is None or defended is None else defended - plain
        lines.append(f"| {name} | {_percent(plain)} | {_percent(defended)} | {_points(change)} |")
    if report.certified_fraction is not None:
        lines += ["", f"Certified fraction: {_percent(report.certified_fraction)}."]
    settings = ", ".join(f"{k}={_setting(v)}" for k, v in report.settings.items())
    lines += ["", f"Settings: {settings}."]
    lines += [f"Note: {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def plot(report: DefenseReport, path: Path) -> Path | None:
    """Grouped bars: each measured accuracy without and with the defence (None without
    matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the defence plot", stacklevel=2)
        return None
    measured = rows(report)
    fig = Figure(figsize=(1.9 * len(measured) + 2.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for offset, column, label in ((-width / 2, 1, "no defence"), (width / 2, 2, report.defense)):
        xs = [i + offset for i, row in enumerate(measured) if row[column] is not None]
        ys = [100 * float(row[column] or 0) for row in measured if row[column] is not None]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(measured)), [row[0] for row in measured], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report.defense} on {report.images} test images", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.16, top=0.9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_report(
    report: DefenseReport, out_dir: str | Path, *, extra: dict[str, Any] | None = None
) -> list[Path]:
    """Write ``defend.json`` (``extra`` then the report), ``defend.md`` and ``defend.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), **report.to_json()}
    written = [out / "defend.json", out / "defend.md"]
    atomic_write_text(written[0], jsonio.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(written[1], markdown_table(report))
    png = plot(report, out / "defend.png")
    if png is not None:
        written.append(png)
    return written
