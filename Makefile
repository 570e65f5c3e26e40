# The two ways in: `make run` (the dashboard on the embedded synthetic set) and `make test`.
# Targets: run, test (everything; what CI runs), test-fast (all but the `slow` tests: no training, no
# server, no browser), venv, data, clean-venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYNTH := data/synthetic

.PHONY: run test test-fast venv data clean-venv

# The venv is rebuilt when requirements.txt is newer than the stamp (stale) or missing.
$(VENV)/.stamp: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.stamp

# Test-only extras (a real MLflow server for tests/test_mlflow.py), kept out of `make run`.
$(VENV)/.dev-stamp: requirements-dev.txt $(VENV)/.stamp
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# synth.json is written last, so its presence means a complete data set.
$(SYNTH)/synth.json: | $(VENV)/.stamp
	@echo "First start: generating the synthetic data set in $(SYNTH) (2,000 images; about 1-2 minutes, once)."
	$(PY) -m retino synth $(SYNTH)

data: $(VENV)/.stamp $(SYNTH)/synth.json

# Streamlit opens a browser where the machine has a display (.streamlit/config.toml leaves headless to it).
run: data
	@echo "Retino's dashboard: open http://localhost:8501 in a browser (Ctrl-C here stops it)."
	$(PY) -m streamlit run app.py

test: data $(VENV)/.dev-stamp
	@echo "Running the whole test suite: it trains small models on the CPU, so expect tens of minutes."
	$(PY) -m pytest -q tests

# The inner loop: tests that train nothing and start no server.
test-fast: data
	$(PY) -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
