# The two set-up commands: `make demo` (install, then make one image on the embedded defaults)
# and `make test` (install with every extra the tests need, then run them). Both create .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PROMPT ?= a lighthouse at dusk, oil painting
# torch first and pinned: an open-ended torch requirement pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench install-local install-test

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "easel needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

install-local: $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[local,nsfw]'

install-test: $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet 'aioboto3>=13,<16'
	$(PIP) install --quiet -e '.[local,nsfw,cloud,discord,semantic,s3,provenance,reports,cluster,dev]'

demo: install-local
	$(VENV)/bin/easel imagine "$(PROMPT)" --seed 42

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (lint everywhere; format on the core and the composition root), mypy (strict on the
# core), import-linter (the layering: see [tool.importlinter] in pyproject.toml).
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check bot/core bot/bootstrap.py
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install-test
	$(PY) -m bench.pipeline_overhead
	$(PY) -m bench.cloud_throughput
	$(PY) -m bench.discord_burst
