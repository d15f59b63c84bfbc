# `make test` is the one command CI and people run: it creates .venv if missing, installs .[dev] and runs the whole
# suite on the 8-device fake CPU mesh (tests/conftest.py sets XLA_FLAGS before jax is imported).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is the CPU build that lies on these machines; pinned in .[dev] so nothing pulls CUDA wheels.
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m train.bench forward --config tiny-hybrid --seq 4096

clean:
	rm -rf $(VENV) .pytest_cache
