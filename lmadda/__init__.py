"""lmadda: Layer-Matching Adversarial Discriminative Domain Adaptation for virtual staining.

The science (data, models, training, adaptation, evaluation) lives here in plain PyTorch;
Ray Train / Tune / Serve live at the edges (`tune/`, `serve/`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmadda")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from lmadda.errors import LmaddaError

__all__ = ["LmaddaError", "VirtualStainer", "__version__"]


def __getattr__(name: str):
    """`lmadda.VirtualStainer` (the facade, lmadda.stainer) is imported on first use: `import lmadda` stays cheap
    (no torch), which the CLI's start-up and `lmadda --help` rely on."""
    if name == "VirtualStainer":
        from lmadda.stainer import VirtualStainer

        return VirtualStainer
    raise AttributeError(f"module 'lmadda' has no attribute {name!r}")
