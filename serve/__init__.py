"""The Ray Serve virtual-staining endpoint: `lmadda_serve.codec` (HTTP bodies, no Ray), `lmadda_serve.registry`
(models by MLflow alias), `lmadda_serve.app` (the Serve deployment and its FastAPI routes)."""
