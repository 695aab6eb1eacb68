# Everything needs only python3 (3.11+) and make: the virtual environment is
# built from the hashed lock files with pip, and rebuilt when they change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
PORT   ?= 8000
TEST_WORKERS ?= 2
# `make mutate MUTATE='app.callback_urls*'` runs one module's mutants; empty runs them all.
MUTATE ?=

.DEFAULT_GOAL := help
.PHONY: help run serve demo test test-fast test-chaos lint typecheck check migrate bench lock mutate console-screenshots clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Two stamps: running needs only requirements.lock; testing and linting add the dev lock.
# The run install skips byte-compiling (a third of its time): Python compiles on first import.
define install
	@$(PYTHON) -c 'import sys; sys.exit("imagetasks needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(2) --require-hashes -r $(1)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
endef

$(BIN)/.installed-run: requirements.lock pyproject.toml
	$(call install,requirements.lock,--no-compile)
	@touch $@

$(BIN)/.installed: requirements-dev.lock pyproject.toml
	$(call install,requirements-dev.lock)
	@touch $@ $(BIN)/.installed-run

run: $(BIN)/.installed-run ## run the service in sandbox mode (SQLite, local disk, built-in StarMagic simulator); PORT=8000
	$(BIN)/imagetasks serve --sandbox --port $(PORT)

serve: $(BIN)/.installed-run ## run the service with the settings from the environment and .env
	$(BIN)/imagetasks migrate
	$(BIN)/imagetasks serve --port $(PORT)

demo: $(BIN)/.installed-run ## submit one task in the sandbox and watch it through to the stored image
	$(BIN)/imagetasks demo

test: $(BIN)/.installed ## the full suite, as CI runs it (PostgreSQL tests run when a server is reachable)
	$(BIN)/pytest --durations=15 $(PYTEST_ARGS)

test-fast: $(BIN)/.installed ## everything but the chaos suite, on parallel workers (everyday work)
	$(BIN)/pytest -m "not chaos" -n $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

test-chaos: $(BIN)/.installed ## run only the reliability suite
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

lint: $(BIN)/.installed ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed ## mypy (strict) on app/ and bench/
	$(BIN)/mypy app bench

check: lint typecheck test ## everything CI runs

migrate: $(BIN)/.installed-run ## apply the database migrations to DATABASE_URL
	$(BIN)/imagetasks migrate

bench: $(BIN)/.installed ## run the benchmark; results in bench/results/ and docs/performance.md
	$(BIN)/python -m bench

console-screenshots: $(BIN)/.installed ## re-take docs/console-*.png with the console's browser tests (needs chromium)
	UPDATE_DOCS_SCREENSHOTS=1 $(BIN)/pytest tests/console/test_browser.py -p no:randomly $(PYTEST_ARGS)

mutate: $(BIN)/.installed ## mutation testing of the promise modules ([tool.mutmut] in pyproject.toml)
	$(BIN)/mutmut run $(if $(MUTATE),"$(MUTATE)")
	$(BIN)/mutmut results

lock: ## re-resolve the lock files from pyproject.toml (needs uv)
	uv pip compile pyproject.toml --group build --generate-hashes --python-version 3.11 --universal --no-header -q -o requirements.lock
	uv pip compile pyproject.toml --group build --group dev --generate-hashes --python-version 3.11 --universal --no-header -q -o requirements-dev.lock

clean: ## remove the virtual environment and local data
	rm -rf $(VENV) var mutants .pytest_cache .mypy_cache .ruff_cache

.PHONY: container-test
container-test: $(BIN)/.installed ## build the Dockerfile with buildah and run the image on the local PostgreSQL (root)
	$(BIN)/python -m tests.container.run
