# DeepLab V1 batch segmentation — every entry point sets itself up.
#   make run         create .venv, install, segment the bundled samples with the demo model (local Ray)
#   make test        create .venv, install, run the test suite (all but the `slow` marker)
#   make install     create .venv only
#   make gpu-check   the CUDA paths once (bench/gpu_check.py; no .venv: python3 with torch, + wheels from .whl/)
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

.PHONY: install run test test-all test-gpu demo-model bench bench-network bench-crf bench-pipeline browser clean \
	gpu-wheels gpu-check

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

# GPU readiness (issue #14). The GPU machine has python3 + torch only (no internet, no Ray, no
# .venv), so gpu-check never depends on `install`. The interpreter: GPU_PYTHON if set, else
# $(PYTHON) when it imports torch, else $(PY) when .venv exists (a CPU-only developer machine or
# CI), else $(PYTHON). If that interpreter lacks numpy, pillow, safetensors or fsspec (pipeline.crf
# imports it via pipeline.devices), the wheels that `make gpu-wheels` put in .whl/ (copied there
# with the work tree) are installed into $(GPU_SITE), which the script appends to sys.path (what
# the machine has wins). Output: $${OUT:-gpu-check}/.
GPU_WHEELS ?= numpy==2.4.6 pillow==13.0.0 safetensors==0.8.0 fsspec==2026.9.0
GPU_WHEEL_DIR ?= .whl
GPU_SITE ?= /tmp/gpu-site
GPU_PYTHON ?=

gpu-wheels:
	rm -f $(GPU_WHEEL_DIR)/*.whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEEL_DIR) $(GPU_WHEELS)
	@ls -l $(GPU_WHEEL_DIR)/*.whl && du -ch $(GPU_WHEEL_DIR)/*.whl | tail -1

gpu-check:
	@py="$(GPU_PYTHON)"; \
	if [ -z "$$py" ]; then \
	  if $(PYTHON) -c 'import torch' >/dev/null 2>&1; then py="$(PYTHON)"; \
	  elif [ -x "$(PY)" ]; then py="$(PY)"; else py="$(PYTHON)"; fi; \
	fi; \
	site=; \
	if $$py -c 'import numpy, PIL, safetensors, fsspec' >/dev/null 2>&1; then :; \
	elif ls $(GPU_WHEEL_DIR)/*.whl >/dev/null 2>&1; then \
	  if $$py -m pip --version >/dev/null 2>&1; then \
	    $$py -m pip install -q --upgrade --no-index --no-deps --target $(GPU_SITE) $(GPU_WHEEL_DIR)/*.whl; \
	  else $$py -c 'import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob(sys.argv[2] + "/*.whl")]' \
	         $(GPU_SITE) $(GPU_WHEEL_DIR); fi && site="--site $(GPU_SITE)"; \
	else echo "warning: $$py lacks numpy/pillow/safetensors/fsspec and $(GPU_WHEEL_DIR)/ has no wheels (make gpu-wheels)"; fi; \
	echo "gpu-check: $$py $$site"; \
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $$py bench/gpu_check.py $$site --out "$${OUT:-gpu-check}"

clean:
	rm -rf $(VENV) out build .pytest_cache
