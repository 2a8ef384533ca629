# Two commands on a fresh machine (Python 3.11+, git, make): `make run`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 3000
DATA   ?= ./data
ARGS   ?=

.PHONY: run test lint bench bench-realtime bench-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/triolytics serve --host $(HOST) --port $(PORT) --data $(DATA) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# wrk drives the HTTP benchmark when present; fall back to our own generator otherwise.
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 || echo "wrk not installed; bench uses its own load generator"; }

bench: $(STAMP) bench-tools
	$(BIN)/python bench/http_capture.py

bench-realtime: $(STAMP)
	$(BIN)/python bench/ws_stream.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/sessions.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
