# Two entry points, as the README says: `make run` and `make test`.
# Both do all the set-up themselves (scripts/setup.sh): Debian packages
# through apt-get when missing, a virtual environment in .venv, and the
# project installed into it.

VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint typecheck unit clean

setup:
	./scripts/setup.sh $(VENV)

run: setup
	$(VENV)/bin/qiothread run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check qiothread virtio blockdev tests scripts benchmarks

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: setup
	$(MAKE) --no-print-directory lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
