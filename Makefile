PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The runtime alone (make install, make demo): server and sensor ('.[server]': the
# server-only dependencies are an extra so a sensor never installs them), no test toolchain. The dev install
# (make venv, make test) includes the runtime, so it satisfies this stamp too.
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: venv install tools test lint demo bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server]'
	touch $(RUNTIME_STAMP)

venv: $(STAMP)

install: $(RUNTIME_STAMP)

tools:
	@bash scripts/install-test-tools.sh

test: $(STAMP) tools
	PY=$(PY) bash scripts/run-tests.sh

# ruff (style and bug rules) and mypy (types; strict on the pure cores), both configured in
# pyproject.toml and installed by the dev extra. CI runs this before make test.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: $(RUNTIME_STAMP)
	$(PY) -m pipeline.demo $(DEMO_ARGS)

# make bench                  full run (3 runs per figure; see docs/performance.md for its length)
# make bench BENCH_QUICK=1     one short run of each figure (smoke check, not for docs/performance.md)
# make bench BENCH_ARGS="--only ingest,drain --runs 5"
bench: $(STAMP)
	$(PY) -m bench $(if $(filter-out 0,$(BENCH_QUICK)),--quick) $(BENCH_ARGS)

proto: $(STAMP)
	cd internet-monitoring && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. pipeline/proto/control.proto pipeline/proto/data.proto pipeline/proto/remote_write.proto

clean:
	rm -rf $(VENV) var .pytest_cache
