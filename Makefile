# The two commands a newcomer needs:  make demo  and  make test
# Each creates .venv/ when missing and installs the project (CPU torch from local disk).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_probe_installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/check_equivalence.py --ep 2 --experts 8 --topk 2 --replica-slots 2 --trials 8

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
