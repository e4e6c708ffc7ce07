# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test clean

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) runs
