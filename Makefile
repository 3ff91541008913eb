# The two commands of the README, and the pieces they are made of. Each target installs what it
# needs into .venv first (torch 2.14.1 / torchvision 0.29.1 and the pins in pyproject.toml).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test assets clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (offline digits preset).
demo: $(STAMP)
	$(VENV)/bin/acpo train --preset digits --set train.cpus_per_worker=2

test: $(STAMP)
	$(PY) -m pytest -q

# Re-create assets/digits from scratch (~25 minutes on 2 CPU cores).
assets: $(STAMP)
	$(VENV)/bin/acpo assets build --out assets/digits

clean:
	rm -rf $(VENV) runs .pytest_cache
