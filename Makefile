# jasper-consumer — one command surface for developers and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/local.yaml
SIM_PORT ?= 8081

.DEFAULT_GOAL := help
.PHONY: help run test lint unit integration simulator clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP) ## run the service with the built-in Jasper simulator against local RabbitMQ
	@scripts/check-rabbitmq || exit 1
	@echo "simulator on :$(SIM_PORT), service with $(CONFIG); Ctrl-C stops both"
	@trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	$(BIN)/jasper-consumer simulator --port $(SIM_PORT) --config $(CONFIG) & sim=$$!; \
	$(BIN)/jasper-consumer run --config $(CONFIG)

simulator: $(STAMP) ## run only the Jasper simulator
	$(BIN)/jasper-consumer simulator --port $(SIM_PORT) --config $(CONFIG)

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check jasper_consumer tests
	$(BIN)/mypy

test: $(STAMP) lint ## lint, then every test (needs RabbitMQ on 127.0.0.1:5672)
	@scripts/check-rabbitmq || exit 1
	$(BIN)/pytest -q

unit: $(STAMP) ## only the tests that need no broker
	$(BIN)/pytest -q --ignore=tests/integration

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
