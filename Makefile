# faceforge: `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench bench-accuracy gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/faceforge demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Heads under equal budgets on synthetic faces and rendered CJK glyphs, 3 seeds (about an hour on 2 cores;
# installs the Debian font packages first, with apt-get). Results: runs/accuracy/default/report.md
bench-accuracy: $(STAMP)
	bash benchmarks/accuracy/install_fonts.sh
	$(BIN)/python benchmarks/accuracy/harness.py

# The GPU check (issue 28), on a GPU machine with its own python3 + torch: nothing installed, faceforge run from
# this checkout; < 8 min on one H100. Results: runs/gpu_check/results.{json,md}. Smoke run on a CPU:
#   python benchmarks/gpu_check.py --device cpu --quick
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
