# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for make test: the suite measured 12 min with 2 on the quiet 2-core box (15.8 beside a CPU hog),
# 23.7 min in one process beside other work (bench/LOG.md, 2026-12-07); each worker starts its own session servers
TEST_WORKERS ?= 2

.PHONY: demo test serve lint clean postgres

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaepipe demo

# tests/test_postgres.py runs the PostgreSQL server binaries (Debian's postgresql package): installed here when
# missing and running as root; otherwise those tests skip and say how to install them
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "PostgreSQL missing: tests/test_postgres.py will skip (sudo apt-get install postgresql)"; fi; }

test: $(STAMP) postgres
	$(BIN)/ruff check pipeline vae flows tests bench
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --durations=25

# Prefect server, MLflow server and the deployment runner on 127.0.0.1; e.g. make serve SERVE_ARGS="--mlflow-port 5001"
serve: $(STAMP)
	$(BIN)/vaepipe serve $(SERVE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline vae flows tests bench

clean:
	rm -rf $(VENV) data runs mlflow.db mlartifacts .vaepipe
