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

bench: $(STAMP)
	$(PY) -m bench

proto: $(STAMP)
	cd internet-monitoring && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. pipeline/proto/control.proto pipeline/proto/data.proto

clean:
	rm -rf $(VENV) var .pytest_cache
