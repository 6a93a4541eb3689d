# The two front-door commands (README): `make demo` and `make test`. `.ci/run` calls `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench bench-api bench-taylorseer services clean

venv: $(STAMP)

# torch first (requirements-cpu.txt pins the CPU build), then the project with every extra.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -e '.[quant,service,test]'
	touch $(STAMP)

services:
	bash scripts/ensure-services.sh

test: venv services
	$(BIN)/python -m pytest tests -q

demo: venv
	bash scripts/demo.sh

bench: venv
	$(BIN)/bagel bench --size small --json var/bench/small.json

# Submit throughput of the HTTP API on the local PostgreSQL (scripts/bench_api.py).
bench-api: venv services
	$(BIN)/python scripts/bench_api.py

bench-taylorseer: venv
	$(BIN)/bagel bench --size small --scenario tryon8_taylorseer t2i1_taylorseer --json var/bench/taylorseer.json

clean:
	rm -rf var .pytest_cache
