# streamrec: the two commands.
#   make serve   install into .venv if needed, then serve MovieLens-100K on 127.0.0.1:50051
#   make test    install (with test extras) into .venv if needed, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: serve test install gpu-test proto clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/streamrec serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# On a machine with a CUDA GPU: the GPU tests (skipped elsewhere).
gpu-test: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis
