# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-text test test-fast lint format venv clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ldmkit demo --out runs/demo

# The text-to-image path on the same digits: captioned shards -> MiniLM -> latent cache -> training.
demo-text: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ldmkit demo --config configs/demo/mnist_text_dit.yaml --out runs/demo-text/run

# One pytest-xdist worker per core (at most 4; tests/conftest.py shares the cores' threads among them).
XDIST := -n auto --maxprocesses 4 --dist worksteal

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(XDIST) --durations=15 tests

# Style: ruff (line length 120, pyflakes, isort, and ruff format's layout; settings in pyproject.toml).
# Part of `make test`. `make format` rewrites the files to pass.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The edit loop: everything but the end-to-end runs marked slow (make test runs them all, as CI does).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(XDIST) -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py --preset DiT-S/2 --resolution 32 --batch 32 --steps 10

clean:
	rm -rf $(VENV) runs
