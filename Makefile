# jasper-consumer — one command surface for developers and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Three installs, each on top of the one before: what the service needs (run, the demos),
# the dev extra (tests, lint, deploy checks), the bench extra (make bench).
SERVICE := $(VENV)/.service
STAMP  := $(VENV)/.installed
BENCH  := $(VENV)/.bench
CONFIG ?= config/local.yaml
SIM_PORT ?= 8081
TOOLS  := $(CURDIR)/.tools/bin
LOCK   := deploy/requirements.lock
# promtool checks the alert rules: from PATH, else extracted from Debian's prometheus package.
PROMTOOL ?= $(or $(shell command -v promtool 2>/dev/null),$(TOOLS)/promtool)
export PROMTOOL
# tinyproxy, a real forward proxy for the proxy tests: from PATH, else extracted from Debian's
# tinyproxy-bin package into $(TOOLS); where it cannot be, those tests skip and say why.
TINYPROXY ?= $(or $(shell command -v tinyproxy 2>/dev/null),$(TOOLS)/tinyproxy)
export TINYPROXY

.DEFAULT_GOAL := help
.PHONY: help run test lint unit integration simulator clean demo demo-reconcile schemas validate-deploy bench mixin lock chromium chaos

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The runtime dependencies come from the image's lock file first, so the tests run the
# versions the image ships; then the package; then the extras a target needs.
$(SERVICE): pyproject.toml $(LOCK)
	@$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): Python >= 3.11 with" \
	  "venv is needed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet -e .
	@touch $(SERVICE)

$(STAMP): $(SERVICE)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(BENCH): $(SERVICE)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH)

run: $(SERVICE) ## run the service with the built-in Jasper simulator against local RabbitMQ
	@scripts/check-rabbitmq || exit 1
	@echo "simulator on :$(SIM_PORT), service with $(CONFIG); Ctrl-C stops both"
	@trap 'kill $$sim 2>/dev/null' EXIT INT TERM; \
	$(BIN)/jasper-consumer simulator --port $(SIM_PORT) --config $(CONFIG) & sim=$$!; \
	$(BIN)/jasper-consumer run --config $(CONFIG)

simulator: $(SERVICE) ## run only the Jasper simulator
	$(BIN)/jasper-consumer simulator --port $(SIM_PORT) --config $(CONFIG)

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check jasper_consumer tests
	$(BIN)/mypy

test: $(STAMP) $(PROMTOOL) $(TINYPROXY) chromium lint ## lint, then every test (needs RabbitMQ on 127.0.0.1:5672); ends with what was not checked
	@scripts/check-rabbitmq || exit 1
	$(BIN)/pytest -q

validate-deploy: $(STAMP) $(PROMTOOL) ## check deploy/: manifests, alert rules, dashboard, Dockerfile, lock (also in test)
	$(BIN)/pytest -q tests/test_deploy.py tests/test_mixin.py tests/test_lock.py

mixin: $(SERVICE) ## regenerate deploy/'s alert rules and Grafana dashboard from jasper_consumer/tools/mixin
	$(BIN)/python -m jasper_consumer.tools.mixin

lock: $(STAMP) ## regenerate deploy/requirements.lock (the image's hashed dependencies); UPGRADE=1 takes newer versions
	$(BIN)/uv pip compile pyproject.toml deploy/build-requirements.in --quiet --generate-hashes \
	  --universal --python-version 3.11 --custom-compile-command "make lock" \
	  $(if $(UPGRADE),--upgrade) -o $(LOCK)

# Elsewhere than on Debian/Ubuntu (or without root for apt-get update), put promtool on PATH
# (it is in the prometheus release tarball, https://prometheus.io/download/) or set PROMTOOL.
$(TOOLS)/promtool:
	@command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || { \
	  echo "promtool is not on PATH, and this is no Debian-like system to fetch it from:" \
	    "put promtool (https://prometheus.io/download/) on PATH or set PROMTOOL=/path" >&2; \
	  exit 1; }
	@echo "promtool is not on PATH: extracting it from Debian's prometheus package into $(TOOLS)"
	@mkdir -p $(TOOLS)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	{ timeout 120 apt-get download -qq -o APT::Sandbox::User=root prometheus 2>/dev/null || \
	  { timeout 300 apt-get update -qq && \
	    timeout 120 apt-get download -qq -o APT::Sandbox::User=root prometheus; }; } && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > "$@.part" && \
	chmod +x "$@.part" && mv "$@.part" "$@" || { \
	  echo "could not fetch Debian's prometheus package (apt-get update needs root): put" \
	    "promtool on PATH or set PROMTOOL=/path" >&2; exit 1; }

# tests/browser drives the status page in Debian's headless Chromium; browsers downloaded at
# run time are not reachable in a closed network. Installed once (as root, with apt-get);
# where that cannot be done, those tests skip and say why.
chromium: ## Debian's chromium and chromium-driver for tests/browser (as root; else they skip)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium is not installed and cannot be here (needs root and apt-get): tests/browser will skip"; \
	  exit 0; fi; \
	echo "installing Debian's chromium and chromium-driver for tests/browser"; \
	export DEBIAN_FRONTEND=noninteractive; \
	timeout 900 apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	{ timeout 300 apt-get update -qq && timeout 900 apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	echo "could not install chromium: tests/browser will skip"

# Never fails the build: without apt-get (not Debian), root or a network, the proxy tests skip.
$(TOOLS)/tinyproxy:
	@echo "tinyproxy is not on PATH: extracting it from Debian's tinyproxy-bin package into $(TOOLS)"
	@mkdir -p $(TOOLS)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	{ { timeout 120 apt-get download -qq -o APT::Sandbox::User=root tinyproxy-bin 2>/dev/null || \
	    { timeout 300 apt-get update -qq && \
	      timeout 120 apt-get download -qq -o APT::Sandbox::User=root tinyproxy-bin; }; } && \
	  dpkg-deb --fsys-tarfile tinyproxy-bin_*.deb | tar -xO ./usr/bin/tinyproxy > "$@.part" && \
	  chmod +x "$@.part" && "$@.part" -v >/dev/null && mv "$@.part" "$@"; } || \
	{ rm -f "$@.part"; echo "tinyproxy could not be installed (needs Debian's apt-get as root," \
	  "and the network): the forward-proxy tests will be skipped"; }


unit: $(STAMP) $(PROMTOOL) ## only the tests that need no broker (not integration/, reliability/, browser/, the chaos soak)
	$(BIN)/pytest -q --ignore=tests/integration --ignore=tests/reliability --ignore=tests/browser \
	  --ignore=tests/chaos/test_chaos.py

demo: $(SERVICE) ## scripted run against the simulator: commission, decommission, failures, a paused type
	@scripts/check-rabbitmq || exit 1
	$(BIN)/python -m jasper_consumer.tools.demo

demo-reconcile: $(SERVICE) ## reconcile against the simulator: a report of each kind, --fix, a second report
	@scripts/check-rabbitmq || exit 1
	$(BIN)/python -m jasper_consumer.tools.reconcile.demo

schemas: $(SERVICE) ## regenerate docs/schemas/ (JSON Schemas of the messages) from the models
	$(BIN)/python -m jasper_consumer.tools.schemas docs/schemas

bench: $(BENCH) ## benchmarks against the broker and the simulator (< 10 min; not part of test): BENCHMARKS.md
	@scripts/check-rabbitmq || exit 1
	$(BIN)/python -m bench

# The soak's length (active phase, minutes) and seed; a seed printed by a run replays it.
# REPLICAS (2 or 3) and WITHOUT (fault kinds left out, comma-separated) make other plans.
MINUTES ?= 10
REPLICAS ?= 3
chaos: $(STAMP) ## seeded randomized fault soak of 3 replicas (MINUTES=10, SEED=…: replay); see tests/chaos
	@scripts/check-rabbitmq || exit 1
	$(BIN)/python -m tests.chaos --minutes $(MINUTES) --replicas $(REPLICAS) \
	  $(if $(SEED),--seed $(SEED)) $(if $(WITHOUT),--without $(WITHOUT))

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
