"""Measuring a model against labels: the metrics (Pearson, SSIM, PSNR, NRMSE), evaluation on held-out images,
and the result rows every table of lmadda is made of."""

import importlib


def __getattr__(name: str):
    # `lmadda.evaluation` was one module; a name a user imported from it is in `evaluate` now, and the error says so
    if not name.startswith("_") and hasattr(importlib.import_module("lmadda.evaluation.evaluate"), name):
        raise ImportError(f"lmadda.evaluation.{name} moved to lmadda.evaluation.evaluate: "
                          f"from lmadda.evaluation.evaluate import {name}")
    raise AttributeError(f"module 'lmadda.evaluation' has no attribute {name!r}")
