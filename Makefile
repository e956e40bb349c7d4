# `make demo` sets everything up and runs the main job; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test test-slow evals serve view bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	./tools/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Chromium for the viewer's browser tests (Debian's, via apt-get, where root and missing)
browser:
	./tools/install_browser.sh

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent demo
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent discover --task ioi --out runs/demo-ioi

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

# scores of circuit discovery and explanations -> evals/RESULTS.md (the quick subset runs in `make test-slow`)
evals: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m evals

serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent serve

view: setup
	HF_HUB_OFFLINE=1 $(BIN)/tdb-agent view

clean:
	rm -rf $(VENV) .pytest_cache
