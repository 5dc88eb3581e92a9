"""`lmadda evaluate`: one row per checkpoint x method x image x marker, each checkpoint kept apart, seeded as the study."""

import copy

import pyarrow.parquet as pq
import pytest
import torch

from lmadda.checkpoint import load_checkpoint, save_checkpoint
from lmadda.cli import main


@pytest.fixture(scope="module")
def two_adapted(tiny_source, tmp_path_factory):
    """Two 'adapted' checkpoints of one method and layer, with different weights and adaptation records."""
    folder = tmp_path_factory.mktemp("evaluate")
    source = load_checkpoint(tiny_source)
    paths = []
    for number, (g_updates, saturated) in enumerate([(5, False), (0, True)]):
        adapted = copy.deepcopy(source)
        with torch.no_grad():
            adapted.generator.layers[0][0].weight.mul_(1.0 + 0.5 * number)
        adapted.metadata = {"method": "lmadda", "layer": 3, "adapt_config": {"lr": 1e-4}, "collapsed": False,
                            "d_saturated": saturated, "g_updates": g_updates}
        paths.append(save_checkpoint(folder / f"run{number}" / "adapted.pt", adapted))
    return folder, paths


def _evaluate(tiny_synth, checkpoints, out, *extra):
    return main(["evaluate", *map(str, checkpoints), "--manifest", str(tiny_synth.source), "--setting", "bright_field",
                 "--out", str(out), *extra])


def test_two_checkpoints_of_one_method_and_layer_stay_apart_with_their_adaptation_record(tiny_synth, two_adapted, capsys):
    folder, paths = two_adapted
    out = folder / "apart.parquet"
    assert _evaluate(tiny_synth, paths, out) == 0
    rows = pq.read_table(out).to_pylist()
    assert {r["checkpoint"] for r in rows} == {str(p) for p in paths}
    by_checkpoint = {str(p): [r for r in rows if r["checkpoint"] == str(p)] for p in paths}
    assert len(by_checkpoint[str(paths[0])]) == len(by_checkpoint[str(paths[1])]) == len(rows) / 2
    first, second = (by_checkpoint[str(p)] for p in paths)
    assert {(r["method"], r["layer"], r["matched"]) for r in rows} == {("lmadda", 3, "3")}
    assert {(r["g_updates"], r["d_saturated"]) for r in first} == {(5, False)}
    assert {(r["g_updates"], r["d_saturated"]) for r in second} == {(0, True)}
    assert [r["pearson"] for r in first] != [r["pearson"] for r in second]  # two models, two measurements
    printed = capsys.readouterr().out
    assert str(paths[0]) in printed and str(paths[1]) in printed


def test_an_existing_out_is_refused_before_any_work_and_replaced_with_overwrite(tiny_synth, two_adapted, capsys):
    folder, paths = two_adapted
    out = folder / "again.parquet"
    assert _evaluate(tiny_synth, paths[:1], out) == 0
    first, written = pq.read_table(out).to_pylist(), out.read_bytes()
    capsys.readouterr()
    assert _evaluate(tiny_synth, paths[:1], out) == 2
    error = capsys.readouterr().err
    assert f"results table {out} already exists" in error and "--overwrite" in error
    assert out.read_bytes() == written  # untouched
    assert _evaluate(tiny_synth, paths, out, "--overwrite") == 0
    replaced = pq.read_table(out).to_pylist()
    assert len(replaced) == 2 * len(first) and {r["checkpoint"] for r in replaced} == {str(p) for p in paths}
    assert not list(out.parent.glob(f".{out.name}.partial"))


def test_source_baselines_reproduce_the_studys_rows_for_the_same_seed(tiny_synth, tiny_source, tmp_path):
    from lmadda.evaluation.rows import TargetDomain
    from lmadda.study.grid import run_grid

    source = load_checkpoint(tiny_source)
    target = "bright_field+noise:0.2"  # a seeded shift: the test images depend on the seed too
    out = tmp_path / "source.parquet"
    assert main(["evaluate", str(tiny_source), "--manifest", str(tiny_synth.source), "--setting", "bright_field", "--shift", "noise:0.2",
                 "--baselines", "histogram_matching,fda", "--seed", "1", "--out", str(out)]) == 0
    evaluated = pq.read_table(out).to_pylist()
    assert {r["method"] for r in evaluated} == {"unadapted", "histogram_matching", "fda"}
    assert all(r["seed"] == 1 and r["checkpoint"] == str(tiny_source) and r["g_updates"] is None for r in evaluated)
    studied = run_grid(source, tiny_synth, [TargetDomain.parse(target)], [], {"device": "cpu"}, seed=1,
                        source_setting="phase_contrast", baselines=("histogram_matching", "fda"), progress=False, log=lambda *_: None)
    key = lambda r: (r["method"], r["field"], r["marker"])
    study_rows = {key(r): r for r in studied if r["target"] == target}
    assert set(study_rows) == {key(r) for r in evaluated}
    for row in evaluated:
        assert row["pearson"] == pytest.approx(study_rows[key(row)]["pearson"], abs=1e-6), key(row)


def test_the_report_keeps_two_checkpoints_of_the_same_method_and_layer_apart():
    from lmadda.study.report import summary_table

    rows = [{"target": "t", "marker": "dapi", "method": "lmadda", "layer": 3, "pearson": value, "checkpoint": path}
            for path, value in (("runs/a.pt", 0.2), ("runs/b.pt", 0.8))]
    table = summary_table(rows)
    assert "lmadda [a.pt] L3" in table and "lmadda [b.pt] L3" in table
    assert "0.200 ± 0.000" in table and "0.800 ± 0.000" in table


@pytest.mark.parametrize("out, make, extra, message", [
    ("notes.txt", "file", [], "--out {out}: results are a Parquet table; name it *.parquet"),
    ("old.parquet", "file", [], "results table {out} already exists; pass --overwrite"),
    ("tables.parquet", "folder", ["--overwrite"], "--out {out} is a folder; name the results table file"),
    ("notes.txt/r.parquet", None, [], "notes.txt is a file, not a folder"),
])
def test_an_out_that_cannot_take_the_table_is_refused_in_one_line_before_any_work(tmp_path, capsys, out, make, extra, message):
    (tmp_path / "notes.txt").write_text("not a table")
    path = tmp_path / out
    if make == "file":
        path.write_text("not a table")
    elif make == "folder":
        path.mkdir()
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    # the checkpoint does not exist: a refusal naming --out shows that no work was started
    code = main(["evaluate", str(tmp_path / "missing.pt"), "--manifest", str(tmp_path / "m.parquet"), "--setting", "bright_field",
                 "--out", str(path), *extra])
    assert code == 2
    assert message.format(out=path) in capsys.readouterr().err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before  # nothing written, no .partial
