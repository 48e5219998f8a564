# Two commands a fresh machine needs: `make quickstart` and `make test`.
# Both create .venv and install the package with its dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format quickstart clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# everything: what CI runs (.ci/run)
test: lint
	$(PY) -m pytest -q

# the unit tier, for use while working: no test that starts Ray, Optuna or MLflow servers or
# trains for more than a few seconds (those are marked `integration`)
test-fast: lint
	$(PY) -m pytest -q -m "not integration"

# The quickstart runs the loss-balance search on the embedded synthetic scenes and the CPU
# network (Ray Tune + Optuna + ASHA, each trial a Ray Train run) and records it in MLflow:
# look at it with `.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db`.
quickstart: $(STAMP)
	$(PY) -m cabb_ray.tune --space search_spaces/quickstart.yaml

clean:
	rm -rf $(VENV)
