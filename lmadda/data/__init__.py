"""Data: images in every format (raw, io, omezarr), pixel size, manifests, input corrections, normalisation, shifts,
augmentation, simulated data and PyTorch datasets. Nothing here knows a model."""
