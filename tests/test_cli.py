import subprocess
import sys

import pytest

from lmadda.cli import build_parser, main


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


@pytest.mark.parametrize("command", list(_subcommands(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lmadda" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "show", "missing.parquet"], "manifest missing.parquet not found"),
        (["data", "synth", "--out", "x", "--fields", "0"], "need at least 1 field"),
        (["data", "index", ".", "--pattern", "(", "--out", "m.parquet"], "not a valid regular expression"),
        (["data", "index", ".", "--pattern", "x", "--out", "m.csv"], "name it *.parquet"),
        (["stain", "notes.txt", "--setting", "bright_field"], "send a .tif/.tiff or .png image"),
        (["stain", "missing.tif", "--setting", "bright_field"], "missing.tif: file not found"),
        (["serve", "--config", "nope.yaml"], "cannot read Serve config nope.yaml"),
        (["serve", "--demo", "no-demo-here"], "run `make demo`"),
    ],
)
def test_bad_input_exits_non_zero_with_one_clear_line(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "lmadda", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmadda: error:") and message in lines[0], result.stderr


def test_synth_then_show_writes_manifest_and_contact_sheet(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--fields", "2", "--size", "64"]) == 0
    assert main(["data", "show", str(tmp_path / "d" / "manifest.parquet"), "--png", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "input  phase_contrast" in out and (tmp_path / "s.png").stat().st_size > 1000


def test_stain_names_an_unreachable_endpoint(tmp_path):
    import tifffile
    import numpy as np

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint16))
    result = subprocess.run([sys.executable, "-m", "lmadda", "stain", "a.tif", "--setting", "x", "--url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "cannot reach http://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("argv", [["sweep", "promote", "--experiment", "lmadda-x", "--tracking-uri", "{uri}"],
                                  ["runs", "compare", "--tracking-uri", "{uri}", "--experiment", "lmadda-x"]])
def test_an_mlflow_server_that_does_not_answer_is_one_line_with_what_to_do(argv, monkeypatch, capsys, free_port):
    port = free_port()  # a port nothing listens on
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{port}"
    assert main([a.format(uri=uri) for a in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"lmadda: error: MLflow at {uri} failed:") and len(error.splitlines()) == 1, error
    assert "check that the server is up and the URI is right, then" in error
