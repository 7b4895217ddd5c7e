"""The fit set against the checkpoint's training data: rows it trained on are refused, another source
is warned about in the output, the detector, summary.json and the report."""

from __future__ import annotations

import numpy as np
import pytest

from gradood.data.sources import open_source
from gradood.pipeline.fit import fit_set_warnings
from gradood.pipeline.summary import print_summary
from gradood.report.run import ErrorReasons, render_run_report

TRAIN_URI = "torchvision://FashionMNIST?split=train"


def _meta(uri: str = TRAIN_URI, start: int = 0, num_rows: int = 50_000) -> dict:
    return {"training": {"data": {"uri": uri, "start": start, "num_rows": num_rows}}}


@pytest.mark.parametrize(
    ("start", "size", "overlap"),
    [(50_000, 10_000, None), (49_990, 100, "49990-49999"), (0, 10, "0-9"), (10, None, "10-49999")],
)
def test_fit_rows_the_model_trained_on_are_refused(start, size, overlap):
    source = open_source(TRAIN_URI, start=start, limit=size)
    if overlap is None:
        assert fit_set_warnings(_meta(), source) == []
        return
    with pytest.raises(ValueError, match=f"include rows {overlap} that the model trained on"):
        fit_set_warnings(_meta(), source)


def test_a_model_trained_on_a_later_range_is_checked_by_its_own_rows():
    source = open_source(TRAIN_URI, start=0, limit=1000)
    assert fit_set_warnings(_meta(start=1000, num_rows=500), source) == []
    with pytest.raises(ValueError, match="include rows 999-999"):
        fit_set_warnings(_meta(start=999, num_rows=500), source)


def test_another_source_or_no_record_is_a_warning_naming_both(tmp_path):
    source = open_source("torchvision://FashionMNIST?split=test", start=0, limit=10)
    (warning,) = fit_set_warnings(_meta(uri=str(tmp_path / "my_photos")), source)
    assert "is not the source the model trained on" in warning
    assert source.uri in warning and str(tmp_path / "my_photos") in warning
    (unknown,) = fit_set_warnings({"training": {}}, source)
    assert "does not record its training data" in unknown


def test_warnings_reach_the_printout_and_the_report(capsys):
    warning = "the fit set /a is not the source the model trained on (/b)"
    summary = {
        "run_id": "night", "corpus": "/lake", "test": "combined", "inputs": 0, "scored": 0, "rejected": 0,
        "skipped": 0, "skipped_reasons": {}, "group_size": 1, "feature_rows": 0, "fdr": 0.05,
        "fdr_method": "bh", "flagged": 0, "flagged_by_driver": {}, "incomplete_sets": 0, "resumed_shards": 0,
        "drift": {"p_value": None}, "output": "/out", "warnings": [warning], "top10": [],
        "adaptive_training_rows": None,
        "prevalence_floor": {"share": 0.004, "min_p_value": 2e-4, "n_calibration": 5000, "fdr": 0.05,
                             "method": "bh"},
    }  # fmt: skip
    print_summary(summary)
    assert f"WARNING: {warning}" in capsys.readouterr().out
    page = render_run_report(summary, [], {}, np.zeros(0), ErrorReasons({}, {}), {})
    assert "<b>Warning</b>" in page and warning in page
    quiet = render_run_report({**summary, "warnings": []}, [], {}, np.zeros(0), ErrorReasons({}, {}), {})
    assert "<b>Warning</b>" not in quiet
