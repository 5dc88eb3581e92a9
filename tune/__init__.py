"""Ray at the edge: Ray Train wrappers for the lmadda loops and the Ray Tune layer sweep.

Nothing here re-implements the science: the per-worker functions drive `lmadda.training` objects,
adding only what distribution needs (devices, DDP, sharded crops, reports, checkpoints).
"""
