# `make test` is the one command CI and people run: it creates .venv if missing, installs .[dev] and runs the whole
# suite on the 8-device fake CPU mesh (tests/conftest.py sets XLA_FLAGS before jax is imported).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test install bench demo ablate clean

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

# The CPU ratio sweep (configs/ablate_cpu.py, under 10 minutes on 2 cores): results, table and plots in runs/ablate.
ablate: $(STAMP)
	$(BIN)/python -m train.ablate --sweep ablate_cpu --out runs/ablate/ablate_cpu

clean:
	rm -rf $(VENV) .pytest_cache

# Train tiny-v4 on the embedded stdlib corpus on the 8-device fake CPU mesh (data x expert x tensor), then
# generate a continuation of two prompts from the saved checkpoint.
demo: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m train.train --config tiny_v4 \
		--workdir runs/demo --mesh data=2,expert=2,tensor=2
	$(BIN)/python -m train.generate --checkpoint runs/demo --prompt "import os" --prompt "def main(" --max-tokens 48
