# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make train   set up .venv + data, then run the main job (pretrain caffenet_mini on Fashion-MNIST)
#   make test    set up the same way, then run the test suite
#   make docs    regenerate docs/results/*.md from docs/results/data/*.json (measured tables + thesis numbers)
# Extra arguments for train.py go in ARGS, e.g. make train ARGS="backbone.freeze=conv3 trainer.max_epochs=2"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup data train test bench docs lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,offline-data,slurm,optuna]'
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
	$(PY) -m transferrable.results_docs $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) logs .cache .pytest_cache
