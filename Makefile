# foedus: `make help` lists the targets. Everything runs inside .venv, made by `make install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTO_SRC := foedus/protos/base.proto foedus/protos/aggregator.proto foedus/protos/director.proto
PROTOC = $(PY) -m grpc_tools.protoc -I. --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc
PLAN ?= plans/local.yaml
# Every port a demo uses moves by PORT_BASE - 50000 (plans/demo_ports.py writes the moved copies
# of its plan and configs under build/ports/ or build/service/config/): two demos, or two clones,
# side by side on one host.
PORT_BASE ?= 50000
# Test files run on this many workers (pytest-xdist, each file whole in one worker).
TEST_WORKERS ?= 2
DEMO_PLAN = build/ports/$(notdir $(PLAN))
SECURE_PLAN ?= plans/secure.yaml
SECURE_DEMO_PLAN = build/ports/$(notdir $(SECURE_PLAN))

.DEFAULT_GOAL := help
.PHONY: help install demo demo-secure demo-service test protos protos-check lint clean

help: ## List the targets with one line each
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'
	@echo "Variables: PORT_BASE=51000 moves every port demo, demo-torch, demo-dp and demo-service"
	@echo "  use by PORT_BASE - 50000 (default 50000: 50051, 50052, 50054, 50350-50359); PLAN=FILE,"
	@echo "  TORCH_PLAN=FILE and DP_PLAN=FILE run demo, demo-torch and demo-dp with another plan"
	@echo "  (its ports moved too)."

install: $(STAMP) ## Create .venv and install foedus with its dev extra

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install ## Run a real federation on localhost: an aggregator and 3 collaborators over mTLS
	@$(PY) -m foedus.plans.demo_ports --base $(PORT_BASE) --out build/ports $(PLAN) >/dev/null
	$(VENV)/bin/pki setup --plan $(DEMO_PLAN)
	@bash plans/demo.sh $(VENV) $(DEMO_PLAN) build/local demo

demo-secure: install ## The demo with secure aggregation: the aggregator learns the sum of the sites' updates, never one
	@$(PY) -m foedus.plans.demo_ports --base $(PORT_BASE) --out build/ports $(SECURE_PLAN) >/dev/null
	$(VENV)/bin/pki setup --plan $(SECURE_DEMO_PLAN)
	@bash plans/demo.sh $(VENV) $(SECURE_DEMO_PLAN) build/secure demo-secure

demo-service: install ## foedus as a service: a director, 3 envoys, `experiment submit`, the best model out, a dashboard screenshot
	PORT_BASE=$(PORT_BASE) bash plans/service/demo.sh

test: install protos-check ## Install if needed, check generated code, run the whole test suite (TEST_WORKERS=2 at once)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

protos: install ## Regenerate protos/*_pb2*.py(i) from the .proto files
	$(PROTOC) --python_out=. --pyi_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTO_SRC)

protos-check: install ## Fail if the checked-in generated code is stale
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(PROTOC) --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO_SRC) && \
	for f in $$(cd $$tmp && find foedus/protos -type f); do \
	  cmp -s $$tmp/$$f $$f || { echo "protos-check: $$f is stale; run 'make protos'"; exit 1; }; \
	done && echo "protos-check: generated code is up to date"

lint: install ## Run ruff and mypy (strict) on our code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: bench
bench: install ## Measure foedus against raw gRPC over mTLS: a table and build/bench.json (BENCH_ARGS="--only secure" or "--only dp", --profile)
	$(PY) tests/benchmark/bench.py --output build/bench.json $(BENCH_ARGS)

clean: ## Remove the virtualenvs, build output and caches
	rm -rf $(VENV) $(OPENFL_VENV) $(TORCH_VENV) build .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# OpenFL 1.9 interoperability. OpenFL cannot share a Python process with foedus (same protobuf
# message names) and pins an older grpcio/protobuf/numpy, so it gets its own virtualenv.
OPENFL_VENV := .venv-openfl
OPENFL_REQUIREMENTS := tests/interop/requirements-openfl.txt
OPENFL_STAMP := $(OPENFL_VENV)/.installed-stamp
.PHONY: interop-env interop

interop-env: $(OPENFL_STAMP) ## Create .venv-openfl with OpenFL 1.9 from PyPI (for make interop)

$(OPENFL_STAMP): $(OPENFL_REQUIREMENTS)
	@start=$$(date +%s); set -e; \
	test -x $(OPENFL_VENV)/bin/python || $(PYTHON) -m venv $(OPENFL_VENV); \
	$(OPENFL_VENV)/bin/python -m pip install --quiet --upgrade pip; \
	$(OPENFL_VENV)/bin/python -m pip install --quiet -r $(OPENFL_REQUIREMENTS); \
	touch $@; \
	echo "interop-env: OpenFL 1.9 installed in $(OPENFL_VENV) in $$(( $$(date +%s) - start )) s"

interop: install interop-env ## Run the OpenFL 1.9 interop tests: its client, collaborators, aggregator
	FOEDUS_OPENFL_VENV=$(OPENFL_VENV) $(PY) -m pytest tests/interop

# PyTorch: the torch runner (torch_runner/) and its example. PyTorch from the package index
# brings CUDA libraries of several GB, so it gets its own virtualenv and `make test` never needs it.
TORCH_VENV := .venv-torch
TORCH_REQUIREMENTS := tests/torch_runner/requirements-torch.txt
TORCH_STAMP := $(TORCH_VENV)/.installed-stamp
TORCH_PLAN ?= plans/torch_digits.yaml
TORCH_DEMO_PLAN = build/ports/$(notdir $(TORCH_PLAN))
DP_PLAN ?= plans/torch_digits_dp.yaml
DP_DEMO_PLAN = build/ports/$(notdir $(DP_PLAN))
.PHONY: torch-env test-torch demo-torch demo-dp

torch-env: $(TORCH_STAMP) ## Create .venv-torch with foedus and its torch extra, PyTorch and Opacus (for test-torch, demo-torch, demo-dp)

$(TORCH_STAMP): pyproject.toml $(TORCH_REQUIREMENTS)
	@start=$$(date +%s); set -e; \
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV); \
	$(TORCH_VENV)/bin/python -m pip install --quiet --upgrade pip; \
	$(TORCH_VENV)/bin/python -m pip install --quiet -r $(TORCH_REQUIREMENTS) -e '.[dev,torch]'; \
	touch $@; \
	echo "torch-env: PyTorch installed in $(TORCH_VENV) in $$(( $$(date +%s) - start )) s"

test-torch: torch-env ## Check the torch runner (mypy strict) and run its tests, a federation included
	$(TORCH_VENV)/bin/mypy --strict foedus/torch_runner/*.py
	$(TORCH_VENV)/bin/python -m pytest tests/torch_runner

demo-torch: torch-env ## The PyTorch example: a CNN on the digits images, 3 collaborators over mTLS
	@$(TORCH_VENV)/bin/python -m foedus.plans.demo_ports --base $(PORT_BASE) --out build/ports $(TORCH_PLAN) >/dev/null
	$(TORCH_VENV)/bin/pki setup --plan $(TORCH_DEMO_PLAN)
	@bash plans/demo.sh $(TORCH_VENV) $(TORCH_DEMO_PLAN) build/torch demo-torch

demo-dp: torch-env ## The PyTorch example with DP-SGD at each site (Opacus, epsilon 8): its accuracy and each site's epsilon
	@$(TORCH_VENV)/bin/python -m foedus.plans.demo_ports --base $(PORT_BASE) --out build/ports $(DP_PLAN) >/dev/null
	$(TORCH_VENV)/bin/pki setup --plan $(DP_DEMO_PLAN)
	@bash plans/demo.sh $(TORCH_VENV) $(DP_DEMO_PLAN) build/dp demo-dp
