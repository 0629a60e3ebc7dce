# Local setup, run and test commands. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC=torch to let pip pick a CUDA build on GPU machines.
TORCH_SPEC ?= torch==2.13.0
# PostgreSQL database used by the second half of `make test`.
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test

.PHONY: install run test test-sqlite test-postgres browser screenshots bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

# Debian packages the tests need: Chromium and CJK fonts for the browser tests (browser downloads
# are not used) and GNU gettext, whose xgettext the translation-coverage test runs.
browser:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	[ -d /usr/share/fonts/opentype/noto ] || missing="$$missing fonts-noto-cjk"; \
	command -v xgettext >/dev/null 2>&1 || missing="$$missing gettext"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "Missing Debian packages:$$missing; run 'sudo apt-get install$$missing'"; exit 1; fi; \
	fi

run: install
	DEBUG=1 $(PY) manage.py runstack

test: install
	$(MAKE) test-sqlite
	$(MAKE) test-postgres

test-sqlite:
	DEBUG=1 $(PY) -m pytest -q

# The browser tests, writing their screenshots over the README's images in docs/screenshots/.
screenshots: install
	DEBUG=1 EDITOR_SCREENSHOT_DIR=docs/screenshots $(PY) -m pytest -q tests/test_browser.py

# The database-facing tests again on PostgreSQL (skipped with a message when none is reachable,
# unless REQUIRE_POSTGRES=1).
test-postgres:
	@if $(PY) -c "import psycopg,sys; psycopg.connect('$(TEST_POSTGRES_URL)', connect_timeout=3).close()" 2>/dev/null; then \
	  DEBUG=1 DATABASE_URL=$(TEST_POSTGRES_URL) $(PY) -m pytest -q tests/test_api_templates.py tests/test_api_jobs.py tests/test_jobstate.py tests/test_e2e_worker.py \
	    tests/test_hostile_input.py tests/test_fuzz_jobs.py \
	    tests/test_faults.py::test_dropped_database_connection_retries_job \
	    tests/test_faults.py::test_killed_worker_job_completes_once; \
	elif [ "$(REQUIRE_POSTGRES)" = 1 ]; then echo "PostgreSQL at $(TEST_POSTGRES_URL) is not reachable"; exit 1; \
	else echo "PostgreSQL at $(TEST_POSTGRES_URL) is not reachable; skipping the PostgreSQL run"; fi

clean:
	rm -rf var/media var/test-db.sqlite3
