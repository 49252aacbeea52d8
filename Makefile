# kneeprep — the two commands a fresh machine needs are `make demo` and `make test`.
# Both create .venv from pyproject.toml when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-out
WORKERS ?= 2

.PHONY: help venv demo shards test test-all bench lint clean

help:
	@echo "make demo    - synthesize the OAI-like sample and rebuild the dataset from it into $(DEMO)/"
	@echo "make test    - run the test suite (under 10 minutes on 2 cores)"
	@echo "make shards  - re-run the shards stage on the demo volumes"
	@echo "make bench   - benchmarks against dcm2niix, nibabel, HF datasets ...; writes bench/RESULTS.md"
	@echo "make lint    - ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per set of extras, redone when pyproject.toml changes.
$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@
$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# test data only: heudiconv's tests/data holds a Siemens XA30 enhanced MR (its dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps heudiconv
	@touch $@ $(VENV)/.stamp-base
# test data only, from PyPI: imagedata's sdist (MIT) holds Siemens Prisma multi-echo series (tests/test_multiecho_real.py)
TESTDATA = $(VENV)/testdata/imagedata-3.9.7.tar.gz
$(TESTDATA): | $(BIN)/python
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: imagedata==3.9.7 -d $(VENV)/testdata
$(VENV)/.stamp-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench,torch]'
	@touch $@ $(VENV)/.stamp-test $(VENV)/.stamp-base

venv: $(VENV)/.stamp-test

demo: $(VENV)/.stamp-base
	@# the sample is made once (same seed, same bytes); a re-run of `make demo` resumes the rebuild
	test -f $(DEMO)/sample/truth.json || $(BIN)/kneeprep synth $(DEMO)/sample --patients 3 --size full --seed 0
	$(BIN)/kneeprep rebuild --recipe 3dreasonknee --raw $(DEMO)/sample/raw \
	    --annotations $(DEMO)/sample --masks $(DEMO)/sample --out $(DEMO) --workers $(WORKERS)
	$(BIN)/kneeprep preview $(DEMO)/volumes.zarr --first --region "femur medial central" -o $(DEMO)/preview.png
	@echo
	@echo "Demo done. Sample: $(DEMO)/sample  volumes: $(DEMO)/volumes.zarr  shards: $(DEMO)/shards"
	@echo "Report: $(DEMO)/report.json   QA picture: $(DEMO)/preview.png   Dataset card: $(DEMO)/shards/README.md"

shards: $(VENV)/.stamp-base
	$(BIN)/kneeprep shards $(DEMO)/volumes.zarr $(DEMO)/sample $(DEMO)/shards --recipe 3dreasonknee
	$(BIN)/kneeprep validate $(DEMO)/shards

test: $(VENV)/.stamp-test $(TESTDATA)
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

test-all: $(VENV)/.stamp-test $(TESTDATA)
	$(BIN)/python -m pytest -q

bench: $(VENV)/.stamp-bench
	$(BIN)/python -m bench.run --out bench/RESULTS.md

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check kneeprep tests bench
	$(BIN)/ruff format --check kneeprep tests bench

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
