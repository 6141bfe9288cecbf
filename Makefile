# The two commands: `make run` (set-up if needed + the pipeline on the embedded default data)
# and `make test`. Everything installs into .venv from constraints.txt (exact versions verified here).
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: run test test-fast env repro batches sweep audit audit-dp federation federation-deployment tune server worker deploy mlflow-ui clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[pipeline,privacy,flower,dev]'
	scripts/install_chromium.sh
	touch $@

env: $(VENV)/.installed

run: env
	$(BIN)/python -m flows.pipeline

test: env
	$(BIN)/python -m pytest -q

test-fast: env  # the unit tests only (no flows, DVC, Dask or benchmarks)
	$(BIN)/python -m pytest -q -m "not slow"

repro: env
	PATH="$(BIN):$$PATH" dvc repro

batches: env
	$(BIN)/python -m flows.batches

sweep: env
	$(BIN)/python -m flows.sweep

audit: env
	$(BIN)/python -m flows.audit

audit-dp: env  # leakage against ε: its own GroupNorm victim under data/dp, the main victim untouched
	$(BIN)/python -m flows.audit --preset dp --root data/dp

federation: env  # a Flower federation on the embedded pool (Simulation Engine), its replies recorded and attacked
	$(BIN)/python -m flows.federation

federation-deployment: env  # the same on Flower's Deployment Engine: a SuperLink and one SuperNode per client on 127.0.0.1
	$(BIN)/python -m flows.federation --engine deployment

tune: env  # Optuna searches the inversion settings on tuning batches (data/tune/chosen.json)
	$(BIN)/python -m flows.tune

# Scheduled runs (prefect.yaml): a Prefect server on 127.0.0.1, a process worker, the deployments.
server worker deploy: export PREFECT_API_URL ?= http://127.0.0.1:4200/api

server: env
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

worker: env
	$(BIN)/prefect worker start --pool gradinv --type process

deploy: env
	$(BIN)/prefect work-pool inspect gradinv >/dev/null 2>&1 || $(BIN)/prefect work-pool create gradinv --type process
	GRADINV_PROJECT=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

mlflow-ui: env
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf data/sets data/victim data/capture data/labels data/invert data/eval data/batches data/sweep data/audit data/dp data/federation data/tune .prefect mlflow.db mlartifacts
