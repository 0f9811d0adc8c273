# make demo   create, use and destroy a real agent on this machine
# make test   install what the tests need (when missing) and run them all
# make bench  measure start-up and list speed
PYTHON ?= python3
VENV_PY := .venv/bin/python
HYPOTHESIS_PROFILE ?= $(if $(CI),ci,dev)

.PHONY: demo test bench deps venv docker clean

demo: deps
	@bash tests/demo.sh

test: deps venv docker
	PATH="$(CURDIR)/.venv/bin:$$PATH" HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(VENV_PY) -m pytest -q tests

bench: deps
	$(PYTHON) tests/bench.py

deps:
	@PYTHON=$(PYTHON) bash tests/setup.sh deps

venv:
	@PYTHON=$(PYTHON) bash tests/setup.sh venv

docker:
	@bash tests/setup.sh docker

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis
