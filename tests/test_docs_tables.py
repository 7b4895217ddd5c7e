"""docs/results.md's tables are rebuilt from the measurement files, and the committed document is current."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from gradood.evaluation import docs_tables
from gradood.evaluation.docs_tables import BENCH_DIR, DOCUMENT, GRID_DIR, MARKER, fill


def test_the_committed_document_is_what_the_committed_measurements_give() -> None:
    text = DOCUMENT.read_text()
    assert fill(text) == text, "docs/results.md is stale: python -m gradood.evaluation.docs_tables"


def test_a_changed_measurement_changes_its_table(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    shutil.copytree(BENCH_DIR, bench)
    path = bench / "feature_throughput_cpu.json"
    records = json.loads(path.read_text())
    key = ("vae", "default", "engine")
    engine = next(r for r in records if (r["model"], r["config"], r["method"]) == key)
    engine["ratio_vs_plain"] = 9.87
    path.write_text(json.dumps(records))
    before, after = fill(DOCUMENT.read_text()), fill(DOCUMENT.read_text(), GRID_DIR, bench)
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(changed) == 1 and changed[0].startswith("| VAE | default | **9.87** |")


def test_a_changed_grid_changes_the_auroc_and_mean_tables(tmp_path: Path) -> None:
    grid = tmp_path / "grid"
    shutil.copytree(GRID_DIR, grid)
    metrics = pd.read_parquet(grid / "metrics.parquet")
    row = (metrics["family"] == "vae") & (metrics["group_size"] == 1) & (metrics["source"] == "glyphs")
    metrics.loc[row & (metrics["test"] == "combined"), "auroc"] = 0.25
    metrics.to_parquet(grid / "metrics.parquet")
    after = fill(DOCUMENT.read_text(), grid, BENCH_DIR)
    glyphs = next(line for line in after.splitlines() if line.startswith("|  | glyphs |") and "0.250" in line)
    assert glyphs.split(" | ")[2] == "0.250"  # no longer bold: not the best B=1 column
    far = metrics[metrics["far_ood"] & (metrics["group_size"] == 1) & (metrics["family"] == "vae")]
    mean = far[far["test"] == "combined"]["auroc"].mean()
    means = next(m.group("body") for m in MARKER.finditer(after) if m.group("name") == "grid-far-means")
    vae_means = next(line for line in means.splitlines() if line.startswith("| vae | "))
    assert vae_means.split(" | ")[1] == f"{mean:.3f}"  # 0.25 on glyphs takes the default off the top


def test_auroc_table_by_hand() -> None:
    rows = []
    cells = [
        (1, "combined", 0.9),
        (1, "combined_fisher", 0.95),
        (1, "paper", 0.95),
        (1, "typicality", 0.5),
        (1, "fullcov", 0.6),
        (1, "complexity", 0.97),
        (5, "combined", 1.0),
        (5, "paper", 0.7),
        (5, "typicality", 0.8),
    ]
    for group_size, test, auroc in cells:
        rows.append({"family": "vae", "group_size": group_size, "source": "digits", "far_ood": True,
                     "test": test, "auroc": auroc})  # fmt: skip
    table = docs_tables.grid_auroc(pd.DataFrame(rows)).splitlines()
    expected = "| vae | digits | 0.900 | 0.950 | 0.950 | 0.500 | 0.600 | **0.970** | 1.000 | 0.700 | 0.800 |"
    assert table[2] == expected


def test_markers_must_match_the_tables() -> None:
    text = DOCUMENT.read_text()
    with pytest.raises(ValueError, match="unknown table markers: \\['nonsense'\\]"):
        fill(text + "\n<!-- table:nonsense -->\n<!-- /table:nonsense -->\n")
    without = text.replace("<!-- table:calibration -->", "").replace("<!-- /table:calibration -->", "")
    with pytest.raises(ValueError, match="without a marker in the document: \\['calibration'\\]"):
        fill(without)


def test_check_fails_on_a_stale_document(tmp_path: Path) -> None:
    stale = tmp_path / "results.md"
    stale.write_text(DOCUMENT.read_text().replace("| VAE | default | **", "| VAE | default | **0", 1))
    assert docs_tables.main(["--check", "--document", str(stale)]) == 1
    assert docs_tables.main(["--document", str(stale)]) == 0
    assert docs_tables.main(["--check", "--document", str(stale)]) == 0
    assert stale.read_text() == DOCUMENT.read_text()
