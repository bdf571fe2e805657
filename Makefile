# Two commands do all the set-up on a fresh machine:
#   make train   create .venv, install, fine-tune the embedded default (configs/tiny.yaml)
#   make test    create .venv, install, run the test suite
# torch is pinned first: a plain `torch` requirement would pull a multi-GB CUDA build where a
# CPU one is wanted. On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC=torch) for the CUDA wheel.
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
CONFIG     ?= configs/tiny.yaml
ARGS       ?= --overwrite
PYTEST_ARGS ?=
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test prepare docs clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/mistral-qlora train $(CONFIG) $(ARGS)

prepare: $(STAMP)
	$(VENV)/bin/mistral-qlora prepare $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# docs/config.md from the config schema (tests/test_config.py fails when it is stale)
docs: $(STAMP)
	$(PY) -m mistral_qlora.tools.config_reference > docs/config.md

clean:
	rm -rf runs .pytest_cache .hypothesis
