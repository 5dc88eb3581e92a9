"""Packaging a generator checkpoint for other tools: `lmadda export` (BioImage Model Zoo, `lmadda.export.bioimageio`)."""
