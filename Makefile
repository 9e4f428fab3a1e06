# clip2scene: `make demo` runs the whole pipeline on a built-in sample, `make test` runs the tests,
# `make bench` runs the benchmarks (appends to docs/benchmarks.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

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

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

clean:
	rm -rf demo runs .pytest_cache
