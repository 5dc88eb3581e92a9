"""The package list misses no folder. (Which module may import which is checked by the import contracts in
pyproject.toml, run by `make test` with import-linter: no circle, arrows only down, no Ray in the science.)"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
