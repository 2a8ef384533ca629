# Two commands on a fresh machine (Python 3.11+, git, make): `make run`, `make test`.
# Installs come from uv.lock, so a fresh clone gets exactly the versions the suite passed
# with; `make lock` refreshes the lock on purpose (see README, "Upgrading dependencies").
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# uv itself comes from PyPI through pip, at this exact version, into its own small venv.
UV_VERSION := 0.13.9
TOOLS  := .tools
UV     := $(TOOLS)/bin/uv
# Use the machine's Python; never download one.
export UV_PYTHON_DOWNLOADS := never
HOST   ?= 127.0.0.1
PORT   ?= 3000
DATA   ?= ./data
ARGS   ?=

.PHONY: run test test-tools lint lock upgrade bench bench-realtime bench-tools screenshot clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# --locked: install exactly uv.lock, and fail if pyproject.toml has changed without it.
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra server --extra lake --python $(PYTHON)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/triolytics serve --host $(HOST) --port $(PORT) --data $(DATA) $(ARGS)

test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q

# The README's shell examples use curl (tests/test_readme.py runs them).
# tests/test_browser_sdk.py drives Debian's `chromium` (/usr/bin/chromium) with Playwright
# for Python (a locked dev dependency); Playwright never downloads a browser of its own.
# tests/test_nginx.py runs deploy/nginx.conf with nginx in front of a server (Debian's
# `nginx`; `nginx-light` is only a wrapper around it). Installing it must not start a
# system nginx on port 80: without a policy-rc.d, a temporary one (exit 101) stops apt
# from starting it, and the unit is disabled (and stopped, were it running) afterwards.
# Tests needing PostgreSQL start their own throwaway server on 127.0.0.1 (bench/pgserver.py,
# tests/conftest.py's `postgres` fixture) from Debian's `postgresql` binaries; as for nginx,
# apt must not start the system cluster, and its unit is disabled afterwards.
test-tools:
	@command -v curl >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq curl) >/dev/null 2>&1 || echo "curl not installed: tests/test_readme.py will skip the README's shell examples"; }
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  rcd=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && rcd=1; } 2>/dev/null; \
	  (apt-get update -qq && apt-get install -y -qq nginx) >/dev/null 2>&1 || echo "nginx not installed: tests/test_nginx.py will be skipped"; \
	  [ -z "$$rcd" ] || rm -f /usr/sbin/policy-rc.d; \
	  systemctl disable --now nginx >/dev/null 2>&1 || true; }
	@test -x /usr/bin/chromium || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed: tests/test_browser_sdk.py will be skipped"; }
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  rcd=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && rcd=1; } 2>/dev/null; \
	  (apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null 2>&1 || echo "postgresql not installed: tests needing PostgreSQL will be skipped"; \
	  [ -z "$$rcd" ] || rm -f /usr/sbin/policy-rc.d; \
	  systemctl disable --now postgresql >/dev/null 2>&1 || true; }

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# Re-resolve after editing pyproject.toml: versions already locked stay where they are.
lock: $(UV)
	$(UV) lock --python $(PYTHON)

# Move every dependency to its newest release that pyproject.toml allows; then `make test`.
upgrade: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# wrk drives the HTTP benchmark when present; fall back to our own generator otherwise.
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 || echo "wrk not installed; bench uses its own load generator"; }

bench: $(STAMP) bench-tools
	$(BIN)/python bench/http_capture.py

bench-realtime: $(STAMP)
	$(BIN)/python bench/ws_stream.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/sessions.py

# docs/dashboard.png: the dashboard with a demo data set, in Debian's chromium (bench/screenshot.py).
screenshot: $(STAMP) test-tools
	$(BIN)/python bench/screenshot.py

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info src/*.egg-info
