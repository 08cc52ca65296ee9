# `make run` and `make test` work on a fresh machine with Python 3.11 or 3.12:
# each creates .venv and installs what it needs first.
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do $$p -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 12)' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install run test bench compare clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 or 3.12 is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/sally-scim dev

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/burst.py $(BENCH_ARGS)

# scim2-server's ASGI app and this project side by side (needs wrk: apt-get install -y wrk).
compare: $(BENCH_STAMP)
	$(BIN)/python bench/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
