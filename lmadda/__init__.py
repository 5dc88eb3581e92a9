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

__all__ = ["LmaddaError", "__version__"]
