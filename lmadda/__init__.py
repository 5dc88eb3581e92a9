"""lmadda: Layer-Matching Adversarial Discriminative Domain Adaptation for virtual staining.

The science (data, models, training, adaptation, evaluation) lives here in plain PyTorch;
Ray Train / Tune / Serve live at the edges (`tune/`, `serve/`).
"""

from lmadda.core.errors import LmaddaError
from lmadda.core.version import __version__

__all__ = ["LmaddaError", "VirtualStainer", "__version__"]


def __getattr__(name: str):
    """`lmadda.VirtualStainer` (the facade, lmadda.stainer) is imported on first use: `import lmadda` stays cheap
    (no torch), which the CLI's start-up and `lmadda --help` rely on."""
    if name == "VirtualStainer":
        from lmadda.stainer import VirtualStainer

        return VirtualStainer
    raise AttributeError(f"module 'lmadda' has no attribute {name!r}")
