# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
# A second run reuses .venv and only reinstalls when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch by default. On a GPU machine pass the CUDA build you want, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lmadda-installed
DEMO_OUT ?= demo-out

.PHONY: demo test bench study clean-demo help

help:
	@echo "make demo   set up .venv and run the demo on the embedded simulated data (output in $(DEMO_OUT)/)"
	@echo "make test   set up .venv and run the test suite"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,zarr,bioimageio]'
	touch $(STAMP)

# The science in one process, then the layer sweep through Ray Tune + MLflow (tune/configs/quick.yaml),
# promoted without target labels (the label-free selector, as a lab would), then the HTTP endpoint on
# the promoted models: one image stained through it, written beside its input.
demo: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/lmadda demo --out $(DEMO_OUT)
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/lmadda sweep run --config tune/configs/quick.yaml --num-cpus 2 --reuse
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/lmadda sweep promote --config tune/configs/quick.yaml --criterion label_free
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/lmadda serve --demo $(DEMO_OUT) --num-cpus 2

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the import contracts in pyproject.toml: no circle, arrows only down, no Ray in the science
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_all.py

# The study behind docs/study.md (about 2 h on 2 CPU cores; reruns skip finished models)
study: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/lmadda study --config docs/study.yaml

clean-demo:
	rm -rf $(DEMO_OUT)
