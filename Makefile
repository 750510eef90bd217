# Two entry points that work on a fresh machine with Python, git and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A pinned local CPU wheel: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# verl for the outrider[verl] tests, without its transformers<5.11 pin (its deps come with dev)
	$(BIN)/python -m pip install -q --no-deps 'verl>=0.9.1,<0.10'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/outrider train recipes/quickstart.yaml --out runs/quickstart --overwrite

# One pytest worker per core (pytest-xdist), a test file per worker at a time so module fixtures are built once;
# every test's runs use one torch thread. TEST_WORKERS=0 runs the suite in this process, serially.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/profile_step.py

clean:
	rm -rf $(VENV) runs
