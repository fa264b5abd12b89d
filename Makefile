# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build the install keeps: `cpu` (the default; the install stops if CUDA wheels arrive)
# or `cuda` (a GPU workstation: PyPI's Linux torch, which brings its nvidia-*/triton wheels).
TORCH_BUILD ?= cpu
# Where torch comes from; empty: pip's configured indexes. A CPU machine whose pip finds only
# PyPI's Linux (CUDA) build takes TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_INDEX ?=
TORCH_FROM = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
CUDA_FIX = On a CPU machine: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu; \
	on a GPU workstation: make install TORCH_BUILD=cuda (README 'Dependencies')
# Exit status 3 when a pip --report plan (argv[1]) installs a CUDA (nvidia-*/triton) wheel, 0
# when not; any other status (an unreadable report) stops the install too.
export CUDA_IN_PLAN := import json, sys; plan = json.load(open(sys.argv[1]))["install"]; \
	sys.exit(3 if any(p["metadata"]["name"].lower().startswith(("nvidia", "triton")) for p in plan) else 0)
# No model hub here: every model comes from a local folder the workflow built (the world's
# pretrained models, tiny random ones).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test lint format bench dag clean-demo lock world world-subjects world-biases world-strength world-training-seeds world-cases world-seeds world-lego

# torch first (the CPU build), then everything else constrained to keep exactly that torch.
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@case "$(TORCH_BUILD)" in cpu|cuda) ;; *) \
		echo "error: TORCH_BUILD=$(TORCH_BUILD): use cpu or cuda (README 'Dependencies')" >&2; exit 2;; esac
	$(PYTHON) -m venv $(VENV)
	@# Resolve first (metadata only): a CPU install stops before GBs of CUDA wheels arrive.
	$(BIN)/python -m pip install -q --dry-run --ignore-installed --report $(VENV)/torch-plan.json \
		$(TORCH_FROM) torch==2.13.0
	@if [ "$(TORCH_BUILD)" = cpu ]; then status=0; \
		$(BIN)/python -c "$$CUDA_IN_PLAN" $(VENV)/torch-plan.json || status=$$?; \
		if [ $$status = 3 ]; then \
			echo "error: pip would install torch's CUDA build here. $(CUDA_FIX)" >&2; exit 1; \
		elif [ $$status != 0 ]; then \
			echo "error: cannot read pip's plan $(VENV)/torch-plan.json" >&2; exit 1; fi; fi
	$(BIN)/python -m pip install -q $(TORCH_FROM) torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	@if $(BIN)/python -m pip list 2>/dev/null | grep -iE '^torchvision'; then \
		echo "error: torchvision was installed; sidpipe runs without it (README 'Dependencies')" >&2; exit 1; fi
	@if [ "$(TORCH_BUILD)" = cpu ] && $(BIN)/python -m pip list 2>/dev/null | grep -iE '^(nvidia|triton)'; then \
		echo "error: torch came with CUDA wheels (rm -rf $(VENV) first). $(CUDA_FIX)" >&2; exit 1; fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/snakemake --profile demo/profile --configfile demo/config.yaml --directory demo
	$(BIN)/snakemake --configfile demo/config.yaml --directory demo --report results/report.html
	@echo "Demo results are in demo/results/ (references, masks, descriptions, train, samples,"
	@echo "attention, metrics with tables and plots, logs);"
	@echo "the Snakemake report is demo/results/report.html."

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint --configfile demo/config.yaml --directory demo

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile rules

bench: install
	$(BIN)/python benchmarks/run.py --out results/bench

# Needs Graphviz's `dot`; the SVG is replaced only when the whole pipe succeeds.
dag: install
	@command -v dot >/dev/null || { echo "error: make dag needs Graphviz's dot (apt install graphviz)" >&2; exit 1; }
	set -o pipefail; $(BIN)/snakemake --rulegraph --configfile config.yaml | dot -Tsvg \
		> docs/rulegraph.svg.tmp || { rm -f docs/rulegraph.svg.tmp; exit 1; }
	mv docs/rulegraph.svg.tmp docs/rulegraph.svg

# Retrain the synthetic world's models (rule pretrain_world, ~35 min on 2 cores) and ship them
# as demo/world/ (the demo's models); the manifest records the settings and code digest.
world: install
	$(BIN)/snakemake --profile demo/profile --configfile demo/config.yaml --directory demo \
		--forcerun pretrain_world results/world/models
	rm -rf demo/world.tmp && cp -r demo/results/world/models demo/world.tmp
	rm -f demo/world.tmp/.snakemake_timestamp  # Snakemake's marker of a directory output
	rm -rf demo/world && mv demo/world.tmp demo/world

# The demo's layers: the demo plus a config on top; each rewrites demo/results/report.html with
# the layer's arms in it.
define demo_layer
	$(BIN)/snakemake --profile demo/profile --configfile demo/config.yaml $(1) --directory demo
	$(BIN)/snakemake --configfile demo/config.yaml $(1) --directory demo --report results/report.html
endef

# The demo plus DreamBooth on all five biased subjects, the base model on them and the
# single-reference experiment (demo/biases.yaml): the grid of the README's world figures.
world-biases: install
	$(call demo_layer,demo/biases.yaml)

# The demo plus DreamBooth at 100, 300 and 600 steps (Case 1 and SID): leak and NSD vs strength.
world-strength: install
	$(call demo_layer,demo/strength.yaml)

# The demo plus DreamBooth trained from seeds 1 and 2 (Case 1 and SID): leak and NSD vs the
# training run (demo/training_seeds.yaml).
world-training-seeds: install
	$(call demo_layer,demo/training_seeds.yaml)

# The demo plus Case 1-4 and the alternatives (negative prompt, masked DreamBooth) on all five
# biased subjects (demo/cases.yaml): metrics/comparisons.csv pairs SID with each.
world-cases: install
	$(call demo_layer,demo/cases.yaml)

# The demo plus SeFi-IDE beside Textual Inversion and DreamBooth (demo/seeds.yaml).
world-seeds: install
	$(call demo_layer,demo/seeds.yaml)

# The demo plus Lego beside multi-vector Textual Inversion on the concept subjects (demo/lego.yaml).
world-lego: install
	$(call demo_layer,demo/lego.yaml)

# Redraw the demo's biased subjects (byte-reproducible) from the world's grammar.
world-subjects: install
	$(BIN)/python -m sidpipe.world.subjects demo/subjects --table demo/subjects.tsv

clean-demo:
	rm -rf demo/results demo/resources demo/.snakemake

# Regenerate constraints.txt (the full lock) from the current venv.
lock: install
	{ echo "# Full lock of the CPU install (generated by 'make lock'); torch pinned so pip never pulls CUDA wheels."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/'; } > constraints.txt
	$(BIN)/python envs/pin_dependencies.py # the conda envs pin what their requirements bring
