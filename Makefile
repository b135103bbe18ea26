# Each target does all set-up on a fresh machine: create .venv if missing, install, run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml requirements-dev.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# make demo [DATA=<image folder>] [MINUTES=3.5]: pretrain a tiny DINOv2 on the CPU; k-NN of random init, raw
# pixels and the trained model; nearest-neighbour and PCA pictures.
demo: $(STAMP)
	$(PY) -m dinokit.demo $(if $(DATA),--data $(DATA)) $(if $(MINUTES),--minutes $(MINUTES))

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
