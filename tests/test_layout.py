"""The layout the README describes holds: the science never imports Ray, and the package list misses no folder."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_RAY = """
import importlib, pkgutil, sys
import lmadda
from lmadda.cli import build_parser
build_parser()  # every command's parser, as `lmadda --help` builds it
for module in pkgutil.walk_packages(lmadda.__path__, "lmadda."):
    if module.name != "lmadda.__main__":
        importlib.import_module(module.name)
print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
"""


def test_no_lmadda_module_and_no_command_line_parser_imports_ray():
    result = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_list_names_every_package_folder_and_no_generic_top_level_name():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"lmadda": "lmadda", **{name: folder for name, folder in setuptools["package-dir"].items()}}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found == set(setuptools["packages"])
    assert not {"tune", "serve"} & {package.split(".")[0] for package in setuptools["packages"]}
