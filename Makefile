# Two commands set everything up on a fresh clone: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install run demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: letting pip choose it would download a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
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

clean:
	rm -rf $(VENV) demo-out .pytest_cache
