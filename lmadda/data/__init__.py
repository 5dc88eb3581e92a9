"""Data: reading images, manifests, normalisation, domain shifts, simulated data, PyTorch datasets."""
