"""Choosing without labels: the label-free criteria (`criteria`), the selector that chooses among candidates
(`selector`) and the per-layer diagnosis (`diagnosis`)."""

from lmadda.core.moved import names_moved_into

# `lmadda.selection` was one module; a name a user imported from it is in `criteria` now, and the error says so
__getattr__ = names_moved_into(__name__, "lmadda.selection.criteria")
