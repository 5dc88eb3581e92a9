"""Choosing without labels: the label-free criteria (`criteria`), the selector that chooses among candidates
(`selector`) and the per-layer diagnosis (`diagnosis`)."""

import importlib


def __getattr__(name: str):
    # `lmadda.selection` was one module; a name a user imported from it is in `criteria` now, and the error says so
    if not name.startswith("_") and hasattr(importlib.import_module("lmadda.selection.criteria"), name):
        raise ImportError(f"lmadda.selection.{name} moved to lmadda.selection.criteria: "
                          f"from lmadda.selection.criteria import {name}")
    raise AttributeError(f"module 'lmadda.selection' has no attribute {name!r}")
