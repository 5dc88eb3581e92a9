"""The Ray Serve virtual-staining endpoint: `serve.codec` (HTTP bodies, no Ray), `serve.registry`
(models by MLflow alias), `serve.app` (the Serve deployment and its FastAPI routes)."""
