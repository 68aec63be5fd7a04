# memetrace: `make demo` runs the pipeline on the built-in demo corpus, `make test` installs and tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-deps

.PHONY: install system-deps demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

# Debian packages the tests need: libmagic1 (AugLy, to generate the benchmark).
$(SYSTEM_STAMP): | $(BIN)/python
	@if ! ldconfig -p | grep -q libmagic.so.1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libmagic1; fi
	touch $@

system-deps: $(SYSTEM_STAMP)

demo: install
	$(BIN)/memetrace --data-dir memetrace-data/demo demo

test: install system-deps
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: install system-deps
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) memetrace-data .pytest_cache
