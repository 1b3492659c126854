# Set-up and the two entry points: `make demo` (train + evaluate) and `make test`.
# Creates .venv, installs cnnlab with its dependencies, and makes sure Fashion-MNIST is present
# (Debian's dataset-fashion-mnist package, installed with apt-get when run as root).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
SUDO := $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: demo test wheel-check bench install data browser clean

demo: install data
	$(BIN)/cnnlab train --recipe fast --out $(DEMO_RUN)
	$(BIN)/cnnlab evaluate $(DEMO_RUN) --no-progress
	@$(BIN)/python -c "import json; s = json.load(open('$(DEMO_RUN)/eval.json')); \
		print(f\"test accuracy: {s['accuracy']:.4f}  (model and reports in $(DEMO_RUN))\")"

# Two workers, each test file on one of them (its module fixtures built once): the suite spends
# much of its time starting Python and torch in subprocesses, which overlap well on 2 cores
# (about 11 minutes there, against about 17 in one process).
TEST_WORKERS ?= 2
# PyTorch threads per worker (and per process a test starts): the cores shared out. With more
# threads than cores, OpenMP's waiting threads take turns with the work: 2 workers of 2 threads
# on 2 cores took 212.6 s for test_train, test_own_data and test_resume, of 1 thread 184.3 s.
TEST_THREADS ?= $(shell n=$$(( $$(nproc) / $(TEST_WORKERS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

test: install data browser
	OMP_NUM_THREADS=$(TEST_THREADS) PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The wheel in a clean virtualenv without extras: train/evaluate/predict work, serve/export/report
# name their extra (.ci/wheel-check; CI runs it after the tests).
wheel-check: install data
	PYTHON=$(PYTHON) .ci/wheel-check

# Benchmarks (not tests): see BENCHMARKS.md.
bench: install data
	$(BIN)/python -m benchmarks recipes --recipes fast,balanced,best --baseline-epochs 6
	$(BIN)/python -m benchmarks levers

install: $(STAMP)

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -m venv --help >/dev/null 2>&1 || ! $(PYTHON) -c "import ensurepip" >/dev/null 2>&1; then \
		if [ -n "$(SUDO)" ]; then apt-get update -qq && apt-get install -y -qq python3-venv python3-pip; \
		else echo "Python's venv module is missing: install python3-venv (apt-get install python3-venv)"; exit 1; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install -q -e '.[all,test]'
	@touch $(STAMP)

# Fashion-MNIST: use the Debian package's files when present, install the package when root;
# otherwise cnnlab itself looks in $$CNNLAB_DATA and ~/.cache/cnnlab, then downloads.
data:
	@missing=0; for f in $(FMNIST_FILES); do [ -f $(FMNIST_DIR)/$$f ] || missing=1; done; \
	if [ $$missing = 1 ] && [ -n "$(SUDO)" ]; then \
		echo "installing Fashion-MNIST (dataset-fashion-mnist)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif [ $$missing = 1 ]; then \
		echo "Fashion-MNIST is not in $(FMNIST_DIR); cnnlab will look in \$$CNNLAB_DATA and ~/.cache/cnnlab, then download it"; \
	fi

# The web-page tests drive Debian's chromium through Playwright (never a downloaded browser);
# without root and without chromium they skip and say why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ -n "$(SUDO)" ]; then \
		echo "installing chromium for the browser tests"; \
		apt-get update -qq && apt-get install -y -qq chromium; \
	fi

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
