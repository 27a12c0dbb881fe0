# The two commands: `make up` (serve on embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
STAMP  := $(VENV)/.installed-stamp

.PHONY: up test results bench install clean-state

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,prod]"
	# kvpress pins transformers < 5.3 in its metadata; its scoring code runs on ours (parity tests only)
	$(BIN)/python -m pip install -q --no-deps "kvpress==0.5.5"
	# open-clip-torch imports torchvision, which fails beside the CPU torch; the TinyCLIP loss test loads its
	# torch-only open_clip/loss.py by path (parity with ClipLoss), so nothing else of it is needed
	$(BIN)/python -m pip install -q --no-deps "open-clip-torch==3.3.0"
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/crucible up --port $(PORT)

test: $(STAMP)
	bash scripts/test.sh

results: $(STAMP)
	$(BIN)/crucible results

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/tracking.py

clean-state:
	rm -rf .crucible
