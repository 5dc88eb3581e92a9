"""Ray at the edge, and only Ray: the sweep's Tune driver and its trials (in a Ray Train worker group or the trial's
own process), the mode-collapse stopper and the backup of Tune's state.

Nothing here re-implements the science: the per-worker functions drive `lmadda.training` objects,
adding only what distribution needs (devices, DDP, sharded crops, reports, checkpoints). What a sweep needs without
Ray (its config, the trial config, MLflow tracking and promotion, the report) is `lmadda.sweep`.
"""

from lmadda.core.moved import name_new_places

# Modules that needed no Ray moved to lmadda.sweep: an old import fails with the new place
MOVED_MODULES = {
    "lmadda_tune.label_free_promotion": "lmadda.sweep.label_free_promotion",
    "lmadda_tune.sweep_config": "lmadda.sweep.config",
    "lmadda_tune.sweep_report": "lmadda.sweep.report",
    "lmadda_tune.tracking": ("lmadda.sweep.tracking", "lmadda.sweep.promotion"),  # runs; promotion into the registry
    "lmadda_tune.trial_config": "lmadda.sweep.trial_config",
}
name_new_places(MOVED_MODULES)
