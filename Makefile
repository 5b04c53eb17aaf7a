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

# the shift workload served at EP 2 on CPU (gloo), stock and PROBE side by side: the table,
# the JSON and the plots land in demo-out/ (about 3-5 minutes on 2 cores)
demo: $(STAMP)
	$(PY) tools/run_probe_inference.py --compare --workload shift --expert-model-parallel-size 2 \
		--json demo-out/shift_ep2.json --plots-dir demo-out

test: $(STAMP)
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
