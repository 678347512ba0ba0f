PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv tools test demo bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

tools:
	@bash scripts/install-test-tools.sh

test: $(STAMP) tools
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m pipeline.demo $(DEMO_ARGS)

# make bench                  full run (3 runs per figure; see README "Performance" for its length)
# make bench BENCH_QUICK=1     one short run of each figure (smoke check, not for the README)
# make bench BENCH_ARGS="--only ingest,drain --runs 5"
bench: $(STAMP)
	$(PY) -m bench $(if $(filter-out 0,$(BENCH_QUICK)),--quick) $(BENCH_ARGS)

proto: $(STAMP)
	cd internet-monitoring && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. pipeline/proto/control.proto pipeline/proto/data.proto

clean:
	rm -rf $(VENV) var .pytest_cache
