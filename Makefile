# fedsim: `make quickstart` runs the main job, `make test` the tests; both install first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The tiny model is cached here between runs.
export FEDSIM_CACHE_DIR ?= $(CURDIR)/.cache/fedsim
# DeepSpeed's JIT-compiled ops depend on the machine, not the checkout: build them once per
# machine (minutes), whichever clone runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/fedsim/torch_extensions

.PHONY: install quickstart test test-all quality format docs clean

# The install and the quickstart say what they do in one line each rather than echoing commands;
# pip at -qq shows errors only (its warnings about a machine's own index settings, and setuptools'
# editable-install notice, are not the user's business; a failed install still prints why).
$(VENV)/.installed: pyproject.toml
	@echo "fedsim: installing into $(VENV) with pinned dependencies (a few minutes, once)"
	@$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -qq torch==2.13.0
	@$(PY) -m pip install -qq -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

quickstart: install
	@$(VENV)/bin/fedsim run experiments/quickstart.yaml --overwrite

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

quality: install
	$(VENV)/bin/ruff check fedsim tests benchmarks
	$(VENV)/bin/ruff format --check fedsim tests benchmarks

format: install
	$(VENV)/bin/ruff format fedsim tests benchmarks
	$(VENV)/bin/ruff check --fix fedsim tests benchmarks

# The documentation site, from docs/ into site/; --strict fails on a broken link or anchor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs .cache .pytest_cache
