# make demo: set up, then train / validate / threshold / infer on the embedded coil data (offline)
# make test: set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here only to the build this workplace serves from local disk; pyproject keeps ranges.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO := runs/demo

.PHONY: setup demo test coils bench-quality bench-feedback bench-speed clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/anom train experiment=coils_demo hydra.run.dir=$(DEMO)/train
	$(BIN)/anom threshold ckpt=$(DEMO)/train/checkpoint target_recall=0.95 hydra.run.dir=$(DEMO)/threshold
	$(BIN)/anom validate ckpt=$(DEMO)/train/checkpoint hydra.run.dir=$(DEMO)/validate
	$(BIN)/anom infer ckpt=$(DEMO)/train/checkpoint input=.cache/coils/test heatmaps=flagged hydra.run.dir=$(DEMO)/infer
	@echo "demo outputs: $(DEMO)/{train/checkpoint,threshold,validate,infer}"

test: setup
	$(BIN)/python -m pytest -q

# Dinomaly, PatchCore, VAE and GANomaly on MTD (../shared/data/mtd), one run; writes docs/BENCHMARKS.md
# (~55 min for the first two on 2 cores, plus about 10-15 min each for the VAE and GANomaly)
bench-quality: setup
	$(BIN)/python scripts/bench_quality.py

# MTD split by acquisition group: false alarms on unseen conditions before and after one feedback
# round; writes docs/BENCHMARKS.md (~25 min on 2 cores)
bench-feedback: setup
	$(BIN)/python scripts/bench_feedback.py

# images/s of the model alone and of `anom infer` end to end, side by side with anomalib's Dinomaly
# (~10 min on 2 quiet cores). anomalib lives in its own venv: it is never a dependency of anomcli.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet $(TORCH)
	$(BENCH_VENV)/bin/pip install --quiet -e ".[test]" "anomalib>=2.7,<3"
	touch $@

bench-speed: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python scripts/bench_speed.py

coils: setup
	$(BIN)/python scripts/make_coils.py --root .cache/coils

clean:
	rm -rf runs multirun .cache/coils
