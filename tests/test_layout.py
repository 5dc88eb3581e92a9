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


def test_a_module_that_moved_into_a_package_names_its_new_place():
    import importlib

    import pytest

    from lmadda import MOVED_MODULES
    from lmadda_tune import MOVED_MODULES as MOVED_OUT_OF_TUNE

    for old, new in {**MOVED_MODULES, **MOVED_OUT_OF_TUNE}.items():
        for place in new if isinstance(new, tuple) else (new,):
            importlib.import_module(place)  # the new place exists
        said = f"moved to {' and '.join(new)}: import from the one that holds the name" if isinstance(new, tuple) else \
            f"moved to {new}: import from {new} instead"
        with pytest.raises(ModuleNotFoundError, match=f"{old} {said}"):
            importlib.import_module(old)
    # `lmadda.evaluation` and `lmadda.selection` became packages: a name of the old module points at its new module
    with pytest.raises(ImportError, match="moved to lmadda.evaluation.evaluate: from lmadda.evaluation.evaluate import evaluate_generator"):
        from lmadda.evaluation import evaluate_generator  # noqa: F401
    with pytest.raises(ImportError, match="moved to lmadda.selection.criteria: from lmadda.selection.criteria import predict_layer"):
        from lmadda.selection import predict_layer  # noqa: F401
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):
        from lmadda.selection import no_such_name  # noqa: F401
    # what README shows still imports from where it did
    from lmadda import VirtualStainer  # noqa: F401
    from lmadda.inference import predict_file  # noqa: F401
    from lmadda.models import UNetGenerator  # noqa: F401
