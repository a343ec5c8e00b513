# `make demo`: the whole pipeline on a tiny offline model. `make test`: the test suite.
# `make test-extras`: the tests of the optional integrations (Ray, MLflow, W&B), which it installs, and the
# breadth tests (more backbone families, launch variants, the benchmarks' harnesses) that `make test`
# leaves out to stay within 15 minutes; CI runs both.
# All create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without an NVIDIA GPU, pin torch's version (constraints-cpu.txt); GPU machines keep the default build.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
# Where pip may find CPU-only torch wheels, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu:
# plain PyPI's torch pulls the CUDA packages (about 3 GB) even on a machine without a GPU.
TORCH_INDEX_URL ?=
INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)

.PHONY: demo test test-extras install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt $(CONSTRAINTS) $(INDEX)
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) demo.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not extras and not breadth" tests

$(VENV)/.extras: $(VENV)/.installed requirements-ray.txt requirements-trackers.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-ray.txt -r requirements-trackers.txt \
		$(CONSTRAINTS) $(INDEX)
	touch $@

test-extras: $(VENV)/.extras
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "extras or breadth" tests

clean:
	rm -rf demo_out .pytest_cache
