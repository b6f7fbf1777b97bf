# Chorus: `make simulate` (a short federated run) and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where pip finds the CPU build of torch 2.13.0. Empty: pip's own configuration (a local wheel directory
# or mirror). On a machine without one, use the CPU index, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
CLIENTS ?= 20
ROUNDS ?= 3
# `make simulate` runs the scenario federation is for: CLIENTS devices of the markets the shipped launch base never
# heard (the accents it was trained without) fine-tune it, and held-out speakers of those markets score each round.
# SIMULATE_SET= (empty) runs the plain `chorus simulate` instead: the default base, devices of every market.
LAUNCH_MARKETS ?= accent=en-029,en-gb-scotland,en-gb-x-gbcwmd
SIMULATE_SET ?= --set model.init-checkpoint=shared/models/shipped/launch-6.pt --set split.market=$(LAUNCH_MARKETS) \
	--set synth.speakers=130 --set train.lr=3e-4
# pytest-xdist workers for `make test` (a file's tests stay on one worker, so module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: setup espeak simulate lint test test-fast bench clean

$(BIN)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Chorus needs Python 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The constraint keeps every other package from replacing torch with another (CUDA) build.
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -r requirements.txt -c $(VENV)/constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed espeak

espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) ; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then (sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng >/dev/null); \
	  fi; \
	  command -v espeak-ng >/dev/null 2>&1 || { echo "espeak-ng is missing: install it with 'sudo apt-get install espeak-ng'"; exit 1; }; }

simulate: setup
	$(BIN)/chorus simulate --clients $(CLIENTS) --rounds $(ROUNDS) $(SIMULATE_SET)

# mypy checks what [tool.mypy] in pyproject.toml names (tests/ is not type-checked).
lint: setup
	$(BIN)/ruff check server client shared simulations tests
	$(BIN)/ruff format --check server client shared simulations tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The edit loop: everything but the end-to-end tests (Ray, subprocesses).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
