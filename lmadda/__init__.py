"""lmadda: Layer-Matching Adversarial Discriminative Domain Adaptation for virtual staining.

The science (data, models, training, adaptation, evaluation) lives here in plain PyTorch;
Ray Train / Tune / Serve live at the edges (`tune/`, `serve/`).
"""

from lmadda.core.errors import LmaddaError
from lmadda.core.moved import name_new_places
from lmadda.core.version import __version__

__all__ = ["LmaddaError", "VirtualStainer", "__version__"]

# Modules that lmadda once kept flat in `lmadda/` and that now live in the package that owns their job. An import of
# an old name fails with the new place, rather than with "No module named": a user's script says what to change.
MOVED_MODULES = {
    "lmadda.baselines": "lmadda.corrections.baselines",
    "lmadda.config": "lmadda.core.config",
    "lmadda.diagnosis": "lmadda.selection.diagnosis",
    "lmadda.metrics": "lmadda.evaluation.metrics",
    "lmadda.registry_names": "lmadda.core.registry_names",
    "lmadda.report": "lmadda.study.report",
    "lmadda.result_rows": "lmadda.evaluation.rows",
    "lmadda.selector": "lmadda.selection.selector",
    "lmadda.tiling": "lmadda.models.tiling",
    "lmadda.tracking_store": "lmadda.core.tracking_store",
    "lmadda.zoom": "lmadda.corrections.zoom",
}

# `lmadda.evaluation` and `lmadda.selection` are packages now: their old contents are in `lmadda.evaluation.evaluate` and
# `lmadda.selection.criteria`, and a name imported from the package says so (their __init__).
name_new_places(MOVED_MODULES)


def __getattr__(name: str):
    """`lmadda.VirtualStainer` (the facade, lmadda.stainer) is imported on first use: `import lmadda` stays cheap
    (no torch), which the CLI's start-up and `lmadda --help` rely on."""
    if name == "VirtualStainer":
        from lmadda.stainer import VirtualStainer

        return VirtualStainer
    raise AttributeError(f"module 'lmadda' has no attribute {name!r}")
