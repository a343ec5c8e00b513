# `make demo`: the whole pipeline on a tiny offline model. `make test`: the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without an NVIDIA GPU, pin torch to its CPU build; GPU machines keep the default build.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt $(CONSTRAINTS)
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache
