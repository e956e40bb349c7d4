# `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow serve bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	./tools/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent demo
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent discover --task ioi --out runs/demo-ioi

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent serve

clean:
	rm -rf $(VENV) .pytest_cache
