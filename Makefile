# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DG := VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/dg
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
BENCH_TEXTS ?= 2000
UI_PORT ?= 3000
# Test worker processes: one per core by default; 0 runs the suite in this process.
TEST_WORKERS ?= auto
SAMPLE_QUERY ?= украли телефон, а на нём приложение банка — что делать?

.PHONY: run test check ui serve bench bench-peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed  ## materialize the store from data/faq.xlsx with the local model, then search it
	$(BIN)/embedding-assets materialize
	$(BIN)/embedding-assets status
	$(BIN)/embedding-assets search "$(SAMPLE_QUERY)"

test: $(VENV)/.installed-test  ## the whole test suite, a test file per worker process (TEST_WORKERS)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

check: $(VENV)/.installed  ## `dg check defs`: the code location loads and its definitions are valid
	$(BIN)/python -c "from embedding_assets import settings; settings.dagster_home()"
	$(DG) check defs

ui: $(VENV)/.installed  ## `dg dev`: Dagster webserver and daemon (sensor, schedule, run queue) on http://127.0.0.1:$(UI_PORT)
	$(BIN)/python -c "from embedding_assets import settings; settings.dagster_home()"
	$(DG) dev -h 127.0.0.1 -p $(UI_PORT)

serve: $(VENV)/.installed  ## HTTP search service on http://127.0.0.1:8080 over the published store
	$(BIN)/embedding-assets serve

bench: $(VENV)/.installed-test  ## benchmarks: print their tables
	$(BIN)/python bench/bench_core.py
	$(BIN)/python bench/bench_openai.py --texts $(BENCH_TEXTS)
	$(BIN)/python bench/bench_pgvector.py
	$(BIN)/python bench/bench_retrieval.py
	$(BIN)/python bench/bench_faq.py

bench-peer: $(VENV)/.installed-test  ## the pipeline next to LangChain's indexing API (installs the bench extra)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python bench/bench_peer.py --sizes 201 2000 20000

clean:
	rm -rf $(VENV) .dagster_home data/embeddings.db data/embeddings.db-wal data/embeddings.db-shm
