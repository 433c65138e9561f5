# Two commands set everything up on a fresh clone: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Exact versions the suite passed with (pip constraints); `make lock` refreshes it.
LOCK := src/dreamloom/requirements.lock

.PHONY: install run demo test soak lock clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip setuptools
	# torch first and pinned: letting pip choose it would download a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	# Everything else at the locked versions: a release made after the lock cannot break this install.
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: the studio on http://127.0.0.1:8501 (HOST=0.0.0.0 exposes it: see README).
HOST ?= 127.0.0.1
PORT ?= 8501
run: install
	$(VENV)/bin/dreamloom studio --host $(HOST) --port $(PORT)

# The headless path end to end: generated images -> tiny LoRA -> exports -> sample grid.
demo: install
	$(VENV)/bin/dreamloom demo --out demo-out

test: install
	$(PY) -m pytest -q

# The queue under random SIGKILLs: 3 workers, 30 jobs (minutes of CPU; BENCHMARKS.md).
soak: install
	$(PY) tools/soak.py

# The newest versions pyproject.toml allows, in a fresh venv; the lock is rewritten only if the
# whole suite passes with them.
lock:
	TORCH_VERSION=$(TORCH_VERSION) LOCK=$(LOCK) bash tools/refresh-lock.sh

clean:
	rm -rf $(VENV) .venv-lock demo-out .pytest_cache
