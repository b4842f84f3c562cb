# Everything runs from a virtual environment that `make install` builds from pyproject.toml,
# pinned by constraints.txt, so a fresh machine needs nothing but Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test screenshots serve demo demo-cli pretrain-proxy benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[service,dev]'
	touch $@

# The suite on TEST_WORKERS processes (pytest-xdist): every service fixture (Redis, PostgreSQL, the S3
# server, the stacks' API and Celery worker) is per process and on free ports, so the workers share nothing.
# The slowest tests are listed at the end, so that a CI run shows where its time goes.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=30

# docs/screenshots/*.png, taken by the dashboard's browser test (needs Debian's chromium).
screenshots: install
	COFT_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/service/test_dashboard.py -k adapts

# The whole service on this machine: Redis (unless REDIS_URL is set), migrations, the API on
# 127.0.0.1:8000 (PORT overrides) and one worker; Ctrl-C stops everything. Data in COFT_DATA_DIR (./data).
serve: install
	$(PY) -m app.serve

# The whole story against the service, as an HTTP client: starts `app.serve` on a free port and a
# temporary data dir, uploads a proxy task, runs a CoFT job, prints zero-shot vs adapted accuracy.
demo: install
	$(PY) -m app.demo --start-server

# The same proxy task through the `coft` command line, no service.
demo-cli: install
	$(PY) -m coft.demo

pretrain-proxy: install
	$(PY) -m coft.proxy.pretrain --out coft/proxy/weights

benchmark: install
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache
