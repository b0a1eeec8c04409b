# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test serve lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaepipe demo

test: $(STAMP)
	$(BIN)/ruff check pipeline vae flows tests bench
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/vaepipe serve

lint: $(STAMP)
	$(BIN)/ruff check pipeline vae flows tests bench

clean:
	rm -rf $(VENV) data runs mlflow.db mlartifacts .vaepipe
