# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO   ?= demo_output
# Tests use all cores unless told otherwise; TF logs kept quiet.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when setup.py changes.
$(VENV)/.cpu-installed: setup.py pyproject.toml | $(PY)
	$(PIP) install -q -e ".[cpu]"
	touch $@

$(VENV)/.test-installed: setup.py pyproject.toml | $(PY)
	$(PIP) install -q -e ".[cpu,test]"
	touch $@

install: $(VENV)/.cpu-installed

test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.cpu-installed
	$(PY) tools/run_demo.py --output_dir=$(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
