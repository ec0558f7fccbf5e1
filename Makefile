# DeepLab V1 batch segmentation — every entry point sets itself up.
#   make run         create .venv, install, segment the bundled samples with the demo model (local Ray)
#   make test        create .venv, install, run the test suite (all but the `slow` marker)
#   make install     create .venv only
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch (on these machines a local wheel). Pinned so that pip never pulls
# several GB of CUDA wheels where a CPU build suffices; set TORCH_SPEC/TORCH_INDEX to change.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test test-all test-gpu demo-model bench bench-network bench-crf bench-pipeline browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Headless Chromium (Debian package) for the HTML-report test; skipped where apt is not usable.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	    else echo "note: chromium not installed and apt-get not usable; the browser test will be skipped"; fi; }

run: install
	$(VENV)/bin/deeplab-batch segment

test: install browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# Regenerates pipeline/assets/demo/model.safetensors and pipeline/assets/samples/ (about 5 min on 2 cores).
demo-model: install
	$(VENV)/bin/deeplab-batch make-demo

bench: bench-network bench-crf bench-pipeline

bench-network: install
	$(PY) bench/network.py

bench-crf: install
	$(PY) bench/crf.py

bench-pipeline: install
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) out build .pytest_cache
