"""The sweep's selection rule, best-model table and figures, from trial rows (no Ray)."""

import math

import pyarrow.parquet as pq

from lmadda.study.results import stable_learning_rates
from lmadda.sweep.report import best_per_target, write_sweep_report


def _row(layer, lr, dapi, collapsed=False, target="pc+overexposure:2", magnitude=2.0):
    return {"target": target, "setting": "pc", "shift": "overexposure", "magnitude": magnitude, "layer": layer, "lr": lr, "seed": 0,
            "collapsed": collapsed, "pearson_dapi": dapi, "generator_path": f"/g/{layer}-{lr}.pt"}


ROWS = [_row(0, 1e-5, 0.70), _row(3, 1e-5, 0.74), _row(15, 1e-5, 0.72),
        _row(0, 1e-3, 0.10, collapsed=True), _row(3, 1e-3, 0.90), _row(15, 1e-3, 0.80)]
UNADAPTED = {"pc+overexposure:2": {"pearson_dapi": 0.65, "pearson": 0.65}}


def test_a_rate_that_collapses_at_any_layer_is_not_selected_even_where_it_scores_best():
    assert stable_learning_rates(ROWS) == {"pc+overexposure:2": [1e-5]}
    (best,) = best_per_target(ROWS, UNADAPTED)
    assert (best["layer"], best["lr"], best["pearson"]) == (3, 1e-5, 0.74)  # not 0.90 at the unstable rate
    assert math.isclose(best["gain"], 0.09)


def _results(row, pearson=None):
    """A grid point's result rows (two test images), as the trial function writes them."""
    return [{"target": row["target"], "setting": "pc", "shift": "overexposure", "magnitude": row["magnitude"],
             "method": "adda" if row["layer"] == 15 else "lmadda", "layer": row["layer"], "lr": row["lr"], "seed": 0, "marker": "dapi",
             "field": field, "pearson": row["pearson_dapi"] if pearson is None else pearson, "collapsed": row["collapsed"]}
            for field in ("f0", "f1")]


RESULTS = [r for row in ROWS for r in _results(row)] + [
    {**r, "method": "unadapted", "layer": -1, "lr": None} for r in _results(_row(-1, None, 0.65))]


def test_report_writes_figures_per_rate_the_best_table_and_the_selection(tmp_path):
    written = write_sweep_report(ROWS, RESULTS, UNADAPTED, out_dir=tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"lr_1e-05/pearson_by_layer.png", "lr_0.001/pearson_by_layer.png", "best.parquet", "summary.txt"} <= names
    assert pq.read_table(tmp_path / "best.parquet").to_pylist()[0]["layer"] == 3
    summary = (tmp_path / "summary.txt").read_text()
    assert "collapse at no layer" in summary and "+0.090" in summary


def test_auto_promotion_uses_labels_where_they_exist_and_the_label_free_selector_otherwise():
    from lmadda.sweep.promotion import LABEL_FREE, resolve_criterion

    assert resolve_criterion([{"lf_output_w1": 0.1, "pearson_dapi": 0.8}]) == "pearson"
    assert resolve_criterion([{"lf_output_w1": 0.1, "pearson_dapi": float("nan")}]) == LABEL_FREE
    assert resolve_criterion([{"lf_output_w1": 0.1}, {"g_loss": 1.0}]) == LABEL_FREE


def test_a_sweep_too_small_to_rank_the_criteria_says_so_instead_of_printing_nan():
    from lmadda.sweep.report import format_selection

    rows = [{**_row(layer, 1e-5, dapi), "pearson": dapi, "lf_output_w1": 0.1 * layer} for layer, dapi in ((0, 0.7), (3, 0.74))]
    text = format_selection(rows, UNADAPTED, best_per_target(rows, UNADAPTED))
    assert "not ranked: no target has 3 non-collapsed trials" in text and "nan" not in text
    ranked = format_selection(ROWS_WITH_CRITERIA, UNADAPTED, best_per_target(ROWS_WITH_CRITERIA, UNADAPTED))
    assert "Spearman" in ranked and "output_w1" in ranked


ROWS_WITH_CRITERIA = [{**row, "pearson": row["pearson_dapi"], "lf_output_w1": 1.0 - row["pearson_dapi"]} for row in ROWS]
