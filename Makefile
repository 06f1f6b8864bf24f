# faceforge: `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench bench-accuracy clean

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

clean:
	rm -rf $(VENV) runs build *.egg-info
