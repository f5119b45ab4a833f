# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make train   set up .venv + data, then run the main job (pretrain caffenet_mini on Fashion-MNIST)
#   make test    set up the same way, then run the test suite
#   make docs    regenerate docs/results/*.md from docs/results/data/*.json (measured tables + thesis numbers)
# Extra arguments for train.py go in ARGS, e.g. make train ARGS="backbone.freeze=conv3 trainer.max_epochs=2"

PYTHON ?= python3
comma := ,
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := dev,offline-data,slurm,optuna,parallel
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup data train test bench docs lint clean lock

setup: $(STAMP) data

# requirements.lock pins every package with its sha256 (CPython 3.11, Linux x86_64); `make lock` regenerates it
# from pyproject.toml after a dependency changes there. The project itself goes in editable, without dependencies.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c "import sys, platform; ok = sys.version_info[:2] == (3, 11) and platform.machine() == 'x86_64'; \
		ok or sys.exit(f'$(LOCK) is for CPython 3.11 on x86_64, not {platform.python_version()} on {platform.machine()}: ' \
		'run make PYTHON=python3.11, or make lock on this machine')"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	# albumentations pulls opencv-python-headless, which hides cv2.ximgproc/cv2.optflow: put contrib back last
	$(PY) -m pip install --quiet --no-deps --force-reinstall \
		"opencv-contrib-python-headless==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"
	$(PY) -c "import cv2; cv2.ximgproc.segmentation; cv2.optflow; print('cv2', cv2.__version__, 'with contrib')"
	touch $(STAMP)

# Fashion-MNIST is the offline source dataset; Debian ships it. Without apt/root, the loader's
# dataset.download=true path (needs internet) or a copy in /usr/share/datasets/fashion-mnist is needed.
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found at $(dir $(FASHION_MNIST)) and apt-get is unavailable: run with ARGS='dataset.download=true' (needs internet)"; \
	fi

train: setup
	$(PY) train.py $(ARGS)

# The suite runs on every core with pytest-xdist (TEST_WORKERS=auto: one worker per core, at most 8;
# TEST_WORKERS=0: one process). Tests that share a module-scoped run or a file-level resource are kept on one
# worker by an xdist_group mark. On a CPU with native bf16 the CPU-kind test files also run again as on an
# AVX2-only one (oneDNN and ATen capped at AVX2), as items of the same run: tests/test_cpu_kind_avx2.py.
TEST_WORKERS ?= auto

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8 --dist loadgroup --durations=20 $(ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

# stdlib only: needs the venv's python, not the data
docs: $(STAMP)
	$(PY) -m transferrable.run.results_docs $(ARGS)

# Re-resolve requirements.lock from pyproject.toml (uv; the indexes of pip's config, e.g. a local mirror, included)
lock: $(STAMP)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		$(foreach u,$(shell $(PY) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(u)) \
		--index-strategy unsafe-best-match --no-emit-index-url --no-emit-find-links \
		--custom-compile-command "make lock" -o $(LOCK)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) logs .cache .pytest_cache
