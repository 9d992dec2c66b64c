# Thin wrappers around the `dpharness` CLI; `make help` lists them.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
SYSTEM  ?= water
VARIANT ?= baseline
STEPS   ?= auto
DEVICE  ?= auto
ARGS    ?=

.PHONY: help venv bench train test test-gpu systems variants wheelhouse report export profile regress calibrate floor clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

venv:  ## create .venv (automatic on first use)
	@$(PYTHON) harness/bootstrap.py

bench: venv  ## bench VARIANT (comma list) against baseline: SYSTEM= VARIANT= STEPS= DEVICE=
	$(PY) -m harness bench --system $(SYSTEM) $(foreach v,$(subst $(comma), ,$(VARIANT)),--variant $(v)) --steps $(STEPS) --device $(DEVICE) $(ARGS)

train: venv  ## train your own model: INPUT=path/input.json [VARIANT=] [OUTPUT=] [DEVICE=] [ARGS='--freeze --restart CKPT']
	@test -n "$(INPUT)" || { echo "make train: INPUT=path/to/input.json is required" >&2; exit 2; }
	$(PY) -m harness train $(INPUT) $(if $(filter command line environment,$(origin VARIANT)),--variant $(VARIANT)) $(if $(OUTPUT),--output $(OUTPUT)) --device $(DEVICE) $(ARGS)

TEST_WORKERS ?= auto
test:  ## run the test suite on every core (CPU; tests/gpu skips without CUDA): TEST_WORKERS=0 runs it in one process
	@$(PYTHON) harness/bootstrap.py --dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 --junitxml=build/test-report.xml $(ARGS)

test-gpu: venv  ## the engine on CUDA vs upstream on CUDA (tests/gpu, -m gpu; on the GPU machine, whose python has pytest)
	$(PY) -m pytest -q -m gpu tests/gpu $(ARGS)

systems: venv  ## obtain/verify system data and list neighbour statistics (REGENERATE=1 regenerates copper and alcumg)
ifeq ($(REGENERATE),1)
	$(PY) -m pip install -q -r harness/pins/systemgen-requirements.txt
	$(PY) -m harness systems --regenerate copper alcumg
endif
	$(PY) -m harness systems --setup

variants: venv  ## list variants
	$(PY) -m harness variants -v

wheelhouse:  ## download the offline wheels for a Python 3.12 GPU node into wheelhouse/
	$(PYTHON) -c "import sys; sys.path.insert(0, '.'); from harness.prepare.wheelhouse import download; from pathlib import Path; sys.exit(download(Path('wheelhouse')))"

report: venv  ## write results/report/index.html from results/runs
	$(PY) -m harness report $(ARGS)

export: venv  ## every run record as one flat table: results/export/runs.csv (ARGS="--format parquet")
	$(PY) -m harness export $(ARGS)

profile: venv  ## profile SYSTEM/VARIANT with torch.profiler
	$(PY) -m harness profile --system $(SYSTEM) --variant $(VARIANT) $(ARGS)

floor: venv  ## this card's hardware floor for one SYSTEM training step: results/floor/
	$(PY) -m harness floor --system $(SYSTEM) --device $(DEVICE) $(ARGS)

clean:  ## remove builds and run work dirs (keeps results/runs)
	rm -rf build results/work

comma := ,

regress: venv  ## CI regression job: short CPU sweep vs results/reference/cpu-regression.json
	$(PY) -m harness regress $(ARGS)

calibrate: venv  ## seed-spread calibration of the accuracy gate: SYSTEM= STEPS= DEVICE=
	$(PY) -m harness calibrate --system $(SYSTEM) --steps $(STEPS) --device $(DEVICE) $(ARGS)
