# clip2scene: `make demo` runs the whole pipeline on a built-in sample, `make test` runs the tests
# (`make test-fast` skips those marked slow),
# `make bench` runs the benchmarks (appends to docs/benchmarks.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clip2scene demo --workdir demo

test: $(STAMP)
	$(PY) -m pytest -q

# the suite without the end-to-end and multi-process tests marked slow (a quick check while editing)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf demo runs .pytest_cache
