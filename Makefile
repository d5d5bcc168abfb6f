# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV   := .venv
PYTHON := $(VENV)/bin/python
# torch is pinned to the build this project is tested with; override TORCH to use another (e.g. a CPU wheel).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow benchmark

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PYTHON) -m ldm demo

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

test-slow: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m slow

benchmark: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_unet.py
