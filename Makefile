# Everything runs from a virtual environment that `make install` builds from pyproject.toml,
# pinned by constraints.txt, so a fresh machine needs nothing but Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo pretrain-proxy benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[service,dev]'
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m coft.demo

pretrain-proxy: install
	$(PY) -m coft.proxy.pretrain --out coft/proxy/weights

benchmark: install
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache
