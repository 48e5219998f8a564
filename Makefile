# Two commands a fresh machine needs: `make quickstart` and `make test`.
# Both create .venv and install the package with its dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format quickstart clean

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

test: lint
	$(PY) -m pytest -q

# Until the search exists (cabb_ray.tune), the quickstart builds the embedded dataset and
# prints its instance-size figures.
quickstart: $(STAMP)
	$(PY) -m cabb_ray.data synth --out data/synthetic --num-train 200 --num-val 20 --seed 0
	$(PY) -m cabb_ray.data stats --root data/synthetic --split train --plot data/synthetic/sizes.png

clean:
	rm -rf $(VENV)
