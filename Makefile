# lockgate: make run (embedded stack + demo), make test, make bench, make proto
SHELL := /bin/bash
PY ?= python3
UV := .venv/bin/uv
VENV_PY := .venv/bin/python

.PHONY: setup run up demo test unit integration test-cluster cluster bench proto lint clean

# A fresh machine has only Python: bootstrap uv into the venv, then sync from uv.lock.
.venv/bin/uv:
	$(PY) -m venv .venv
	.venv/bin/pip install -q "uv>=0.5"

# Compiled once here: where PYTHONDONTWRITEBYTECODE is set (this machine, CI, the Dockerfile) nothing is ever
# cached, and every process compiled each module it imports again: ~0.7 s of each CLI call's 1.3 s, and the tests
# start hundreds of processes (CLI calls, `dev up` stacks, served services). A source edited since is recompiled
# in memory as before: Python checks each .pyc against its source.
export UV_COMPILE_BYTECODE := 1

setup: .venv/bin/uv
	$(UV) sync --frozen -q
	$(VENV_PY) -m compileall -q shared services dev

# `make run ARGS="--router-port 0"`: options for `dev up` (a port taken, another --home). The variable tells `dev up`
# to give its advice in this form.
run: export LOCKGATE_VIA_MAKE_RUN := 1
run: export LOCKGATE_MAKE_ARGS := $(ARGS)
run: setup
	.venv/bin/lockgate dev up --demo $(ARGS)

up: setup
	.venv/bin/lockgate up

demo: setup
	.venv/bin/lockgate demo

# Two workers (pytest-xdist), one file at a time each: most tests wait on a nats-server, chDB or a child
# process, and a file's module fixtures (a running stack) start once, on one worker. Each worker has its
# own nats-server, chDB path and temp dirs (tests/conftest.py). `TEST_WORKERS=0`: serial.
# The cluster fault tests run after, alone: their 16 processes under load count requests no router answered
# in time, which a second worker's CPU next to them would turn into a flake.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(VENV_PY) -m pytest -q $(XDIST) -m "not cluster" tests
	$(VENV_PY) -m pytest -q -p no:xdist -m cluster tests/cluster

unit: setup
	$(VENV_PY) -m pytest -q tests/unit tests/contract

integration: setup
	$(VENV_PY) -m pytest -q $(XDIST) tests/integration tests/e2e

# The distributed topology's fault tests alone (they also run in `make test`; `-m "not cluster"` skips them).
test-cluster: setup
	$(VENV_PY) -m pytest -q -m cluster tests/cluster

# A 3-node JetStream cluster on loopback and every service its own process (Ctrl-C stops it all).
cluster: setup
	.venv/bin/lockgate dev cluster

# The bench also times the candidate server stacks (the `bench` dependency group, left out of `setup`).
bench: .venv/bin/uv
	$(UV) sync --frozen -q --group bench
	$(VENV_PY) -m tests.bench.run --out bench/results.json

proto: setup
	$(VENV_PY) -m grpc_tools.protoc -I proto --python_out=shared --pyi_out=shared \
	  --grpc_python_out=shared proto/lockgate/v1/*.proto

lint: setup
	.venv/bin/ruff check shared services dev tests

clean:
	rm -rf .venv .lockgate .pytest_cache
