"""Paper-style tables from protocol job records (pure functions, no models)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from vprompt.engine.protocol_table import (
    Stat,
    base_to_novel_table,
    few_shot_table,
    harmonic_mean,
    plot_few_shot,
    transfer_table,
)

TITLES = {"oxford_pets": "OxfordPets", "dtd": "DTD", "imagenet": "ImageNet", "eurosat": "EuroSAT"}
ORDER = ["imagenet", "oxford_pets", "dtd", "eurosat"]


def rec(dataset: str, shots: int | None, seed: int, **metrics: object) -> dict:
    return {"job": {"dataset": dataset, "shots": shots, "seed": seed}, "metrics": metrics}


def test_stat_is_percent_mean_and_population_std() -> None:
    s = Stat.of([0.5, 0.7])
    assert s.mean == pytest.approx(60.0)
    assert s.std == pytest.approx(10.0)
    assert s.n == 2
    assert s.text() == "60.00 ± 10.00"
    assert Stat.of([0.25]).text() == "25.00"


def test_few_shot_table_rows_in_paper_order_with_average() -> None:
    records = [
        rec("dtd", 1, 1, accuracy=0.40),
        rec("dtd", 1, 2, accuracy=0.50),
        rec("oxford_pets", 1, 1, accuracy=0.80),
        rec("oxford_pets", 1, 2, accuracy=0.90),
        rec("dtd", 16, 1, accuracy=0.6),
        rec("oxford_pets", 16, 1, accuracy=0.9),
    ]
    table = few_shot_table(records, TITLES, ORDER)
    assert table.header == ["Dataset", "1 shot", "16 shots"]
    assert [r[0] for r in table.rows] == ["OxfordPets", "DTD", "**Average**"]
    assert table.rows[0][1] == "85.00 ± 5.00"
    assert table.rows[2] == ["**Average**", "65.00", "75.00"]
    md = table.markdown()
    assert "| OxfordPets | 85.00 ± 5.00 | 90.00 |" in md
    parsed = list(csv.reader(io.StringIO(table.csv())))
    assert parsed[0] == table.header
    assert parsed[1][0] == "OxfordPets"


def test_base_to_novel_hm_from_mean_accuracies_and_average_first() -> None:
    records = [
        rec("dtd", 16, 1, base=0.8, new=0.4, hm=0.0),
        rec("dtd", 16, 2, base=0.6, new=0.6, hm=0.0),
        rec("eurosat", 16, 1, base=0.9, new=0.5, hm=0.0),
    ]
    table = base_to_novel_table(records, TITLES, ORDER)
    assert table.header == ["Dataset", "Base", "Novel", "HM"]
    assert table.rows[0][0] == "**Average**"
    dtd = table.rows[1]
    assert dtd[0] == "DTD"
    assert dtd[3] == f"{harmonic_mean(70.0, 50.0):.2f}"  # HM of the means, not mean of HMs
    avg_base, avg_new = (70.0 + 90.0) / 2, (50.0 + 50.0) / 2
    assert table.rows[0][1:] == [
        f"{avg_base:.2f}",
        f"{avg_new:.2f}",
        f"{harmonic_mean(avg_base, avg_new):.2f}",
    ]


def test_transfer_table_source_targets_and_average() -> None:
    records = [
        {
            "job": {"dataset": "imagenet", "shots": 16, "seed": s},
            "metrics": {"source": 0.7, "targets": {"dtd": 0.4 + 0.1 * s, "eurosat": 0.3}},
        }
        for s in (1, 2)
    ]
    table = transfer_table(records, TITLES, title="Cross-dataset", method="coop")
    assert table.header == ["Method", "Source", "DTD", "EuroSAT", "Average"]
    row = table.rows[0]
    assert row[0] == "coop (16 shots, ImageNet)"
    assert row[2] == "55.00 ± 5.00"
    assert row[4] == f"{(55.0 + 30.0) / 2:.2f}"


def test_missing_cells_show_a_dash_and_no_average() -> None:
    records = [rec("dtd", 1, 1, accuracy=0.4), rec("dtd", 2, 1, accuracy=0.5)]
    records.append(rec("oxford_pets", 1, 1, accuracy=0.8))
    table = few_shot_table(records, TITLES, ORDER)
    assert table.rows[0][2] == "–"  # pets has no 2-shot result yet
    assert table.rows[-1] == ["**Average**", "60.00", "–"]


def test_few_shot_plot_is_written(tmp_path: Path) -> None:
    records = [rec("dtd", k, s, accuracy=0.1 * k**0.5 + 0.01 * s) for k in (1, 4) for s in (1, 2)]
    records.append(rec("dtd", None, 1, accuracy=0.2))
    path = plot_few_shot(records, TITLES, ORDER, tmp_path / "few_shot.png")
    assert path is not None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
