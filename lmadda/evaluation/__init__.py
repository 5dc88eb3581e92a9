"""Measuring a model against labels: the metrics (Pearson, SSIM, PSNR, NRMSE), evaluation on held-out images,
and the result rows every table of lmadda is made of."""

from lmadda.core.moved import names_moved_into

# `lmadda.evaluation` was one module; a name a user imported from it is in `evaluate` now, and the error says so
__getattr__ = names_moved_into(__name__, "lmadda.evaluation.evaluate")
