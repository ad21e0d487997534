# Local development and CI entry points. `make test` is what .ci/run runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The stack module itself rather than `wal stack`: it imports no Faust app.
STACK := $(PY) -m app.ops.stack
NAMESPACES := deploy/local/namespaces.yaml
CODE := app agents tables targets

.PHONY: help venv deps stack-up stack-down stack-status run test lint bench clean

help:
	@echo "make deps | venv | stack-up | stack-down | stack-status | run | test | lint | bench | clean"

venv: $(STAMP)

# Reinstalls whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

deps:
	deploy/local/install-deps.sh

stack-up: deps venv
	$(STACK) up

stack-down: venv
	$(STACK) down

stack-status: venv
	$(STACK) status

# The local fleet's admin key (unless WAL_ADMIN_API_KEY is set): `wal namespaces apply`,
# `wal backfill` and `wal dlq replay` present it, and the worker takes it as its admin key.
run: export WAL_ADMIN_API_KEY ?= local-admin-key
run: export WAL_ADMIN_API_KEYS ?= $(WAL_ADMIN_API_KEY)
run: stack-up
	@if test -f $(NAMESPACES); then $(VENV)/bin/wal namespaces apply -f $(NAMESPACES); fi
	@echo "dashboard: http://127.0.0.1:6066/wal/dashboard  namespaces: http://127.0.0.1:6066/wal/namespaces"
	@echo "metrics:   http://127.0.0.1:6066/metrics        api: http://127.0.0.1:6066/wal/openapi.json"
	@echo "logs: this terminal; stack logs: $(STACK) status"
	exec $(VENV)/bin/wal worker

# Lints first (style and types are part of CI); stops the stack even when pytest
# fails, and exits with pytest's status.
test: deps venv lint
	$(STACK) up || { $(STACK) down; exit 1; }
	status=0; $(VENV)/bin/pytest tests || status=$$?; $(STACK) down; exit $$status

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(CODE)

bench: stack-up
	$(PY) -m tests.bench

clean:
	-test -x $(PY) && $(STACK) down
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
