# Two entry points do all set-up on a fresh Debian machine (as root):
#   make demo   - the main job, headless: execute notebooks/quickstart.ipynb in a real kernel (real microVMs)
#   make lab    - the same notebook in JupyterLab (with the microagent side panel)
#   make test   - the test suite (boots real VMs; TCG where there is no hardware virtualization)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-system-x86 e2fsprogs busybox-static gcc libc6-dev cpio lz4 zstd xz-utils docker-registry \
  chromium slirp4netns nftables mmdebstrap python3-yaml
STATE_DIR ?= $(HOME)/.microagent

.PHONY: setup apt venv bytecode demo lab test bench clean labextension labextension-check panel-into-venv protocol-doc panel-types

setup: apt venv bytecode

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "System packages present."; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(MAKE) --no-print-directory panel-into-venv
	touch $@

# an editable install copies the panel's build once; refresh it after a rebuild
LABEXT_DEST := $(VENV)/share/jupyter/labextensions/microagent-jupyter
panel-into-venv:
	rm -rf $(LABEXT_DEST) && mkdir -p $(LABEXT_DEST)
	cp -r microagent_jupyter/labextension/. labextension/install.json $(LABEXT_DEST)/

venv: $(VENV)/.installed

# the engine's and the extension's bytecode, so that the CLI and each supervisor do not compile their modules at
# every start (PYTHONDONTWRITEBYTECODE, set on these machines, keeps Python from writing it on first use; a pip
# install of a wheel compiles it too): `import microagent_engine.cli` 0.35-0.41 s -> 0.19-0.21 s
bytecode: venv
	$(PY) -m compileall -q microagent_engine microagent_jupyter

# Playwright (npm playwright-core) drives Debian's /usr/bin/chromium; it never downloads a browser
ui-tests/node_modules/.installed: ui-tests/package-lock.json
	cd ui-tests && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Rebuild the JupyterLab panel from labextension/src (the built assets are committed in
# microagent_jupyter/labextension; labextension-check verifies they match the sources)
labextension: venv
	cd labextension && PATH=$(abspath $(VENV))/bin:$$PATH jlpm install && PATH=$(abspath $(VENV))/bin:$$PATH jlpm build:prod
	$(PY) scripts/panel_source_hash.py > microagent_jupyter/labextension/SOURCE_HASH
	$(MAKE) --no-print-directory panel-into-venv

# webpack output is not byte-reproducible across checkout paths, so the build records its sources' hash
labextension-check:
	python3 scripts/panel_source_hash.py --check

# docs/protocol.md is rendered from microagent_engine/protocol.py (tests/test_agent_protocol.py checks it)
protocol-doc:
	python3 scripts/protocol_doc.py

# labextension/src/workspaceSpec.ts from WorkspaceSpec.json_schema() (then make labextension)
panel-types:
	$(PY) scripts/panel_types.py

demo: setup
	$(VENV)/bin/microagent doctor || true
	$(VENV)/bin/microagent run --delete -- sh -c 'echo "hello from $$(hostname), kernel $$(uname -r)"'
	$(PY) scripts/demo.py notebooks/quickstart.ipynb

lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root) \
	  notebooks/quickstart.ipynb

test: setup ui-tests/node_modules/.installed
	$(PY) -m pytest -v -ra

bench: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_storage.py

clean:
	rm -rf $(VENV) .pytest_cache
