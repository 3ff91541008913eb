# The two commands of the README, and the pieces they are made of. Each target installs what it
# needs into .venv first (torch 2.14.1 / torchvision 0.29.1 and the pins in pyproject.toml).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install services demo study stop test test-faults postgres bench assets clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (offline digits preset): a local Ray head and an MLflow
# server (SQLite, 127.0.0.1 only) are started unless the ones an earlier `make services` started are
# still up, the sweep is submitted as a Ray job, and both stay up afterwards so the UI can be browsed
# (`make stop` ends them).
RUNS         := $(abspath runs)
MLFLOW_PORT  ?= 5000
MLFLOW_URI   := http://127.0.0.1:$(MLFLOW_PORT)
SWEEP_NAME   ?= digits-acpo-$(shell date +%Y%m%d-%H%M%S)
# Ray 2.60 clusters require a token (~/.ray/auth_token) once one exists; every ray command here uses it.
# The head binds every port Ray opens (GCS, raylet, object manager, metrics, client, agents) to 127.0.0.1
# (torch.distributed's rendezvous store in a training worker is torch's, on all interfaces: docs/reliability.md, "Security"):
# Ray binds them to the node's IP, and turns 127.0.0.1 into that IP unless cluster mode is off
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, ray_constants.ENABLE_RAY_CLUSTER). A one-machine head only.
export RAY_AUTH_MODE := token
RAY_LOCAL := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
RAY_DASHBOARD_PORT := 8265
RAY_DASHBOARD := http://127.0.0.1:$(RAY_DASHBOARD_PORT)
# What `make services` starts, it records (runs/ray.pid, runs/mlflow.pid: each the leader of its own
# process group, via setsid) and `make stop` ends exactly those groups. A Ray or MLflow already answering
# is used only when it is that record's: on a shared machine whatever else listens on 127.0.0.1 may be
# another user's, and `demo` would hand it the sweep, its tracking and the Ray token. `ray start --block`
# stays in the foreground and takes its Ray processes down on SIGTERM.
#
# $(call require_ours,NAME,PORT,COMMAND,WHAT,HINT) stops make in one line when 127.0.0.1:PORT accepts a
# connection (curl's 7 is "refused") and its recorded process is gone or no longer runs COMMAND (the check
# `make stop` makes), or, where `ss` can name the listener, the listener is outside the recorded group
# (Ray's dashboard is a child of `ray start`, MLflow's uvicorn one of `mlflow server`; another user's
# socket shows no process at all). Expanded with the recipe, before any of its lines runs. `ps -ww`: ps
# cuts a command line at the terminal's width ($COLUMNS, 80 under some callers), and a long path hides COMMAND.
define require_ours
$(if $(shell curl -s -o /dev/null -m 5 http://127.0.0.1:$(2)/; test $$? = 7 && exit; \
	pid=$$(cat $(RUNS)/$(1).pid 2>/dev/null) && ps -ww -o args= -p "$$pid" 2>/dev/null | grep -q "$(3)" || { echo no; exit; }; \
	command -v ss >/dev/null || exit; \
	owners=$$(ss -ltnp "sport = :$(2)" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | paste -sd,); \
	test -n "$$owners" && ps -o pgid= -p "$$owners" | grep -qw "$$pid" || echo no),\
$(error 127.0.0.1:$(2) answers but is not the $(4) that 'make services' started ($(RUNS)/$(1).pid); stop it$(5)))
endef

services: $(STAMP)
	$(call require_ours,mlflow,$(MLFLOW_PORT),mlflow server,MLflow server, or pick a free MLFLOW_PORT)
	$(call require_ours,ray,$(RAY_DASHBOARD_PORT),ray start,Ray head)
	@mkdir -p $(RUNS)
	@test -f $$HOME/.ray/auth_token || $(VENV)/bin/ray get-auth-token --generate >/dev/null
	@curl -s -o /dev/null $(RAY_DASHBOARD) || { $(RAY_LOCAL) setsid $(VENV)/bin/ray start --head --block \
		--node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port=$(RAY_DASHBOARD_PORT) --disable-usage-stats \
		>$(RUNS)/ray-start.log 2>&1 & echo $$! >$(RUNS)/ray.pid; }
	@curl -s -o /dev/null $(MLFLOW_URI)/health || { setsid $(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(RUNS)/mlflow.db \
		--artifacts-destination $(RUNS)/mlflow-artifacts --host 127.0.0.1 --port $(MLFLOW_PORT) >$(RUNS)/mlflow.log 2>&1 & echo $$! >$(RUNS)/mlflow.pid; }
	@for i in $$(seq 90); do curl -s -o /dev/null $(RAY_DASHBOARD) && curl -sf $(MLFLOW_URI)/health >/dev/null && break; sleep 1; done

SUBMIT := $(VENV)/bin/ray job submit --address $(RAY_DASHBOARD) --working-dir . \
		--runtime-env-json '{"excludes": [".venv", "runs", ".git", "*.pyc"]}' --
demo: services
	$(SUBMIT) $(abspath $(PY)) sweeps/acpo_sweep.py --set sweep.name=$(SWEEP_NAME) --set sweep.model_name=digits-acpo \
		--set sweep.storage_dir=$(RUNS)/sweeps --set sweep.tracking_uri=$(MLFLOW_URI)
	@echo "MLflow UI: the experiment's link is printed above (experiment $(SWEEP_NAME) at $(MLFLOW_URI); registered model digits-acpo@champion)"

# A study (sweeps/studies/$(STUDY).yaml) on the same services: `make study` is the digits study
# (under 40 minutes on 2 CPU cores), `make study STUDY=digits-t2i` another. Report: runs/studies/<name>/report/.
STUDY      ?= digits
STUDY_NAME ?= $(STUDY)-study-$(shell date +%Y%m%d-%H%M%S)
study: services
	$(SUBMIT) $(abspath $(PY)) sweeps/acpo_study.py --preset $(STUDY) --set name=$(STUDY_NAME) \
		--set storage_dir=$(RUNS)/studies --set tracking_uri=$(MLFLOW_URI)
	@echo "MLflow UI: $(MLFLOW_URI)  (experiment $(STUDY_NAME)); report: $(RUNS)/studies/$(STUDY_NAME)/report/report.html"

# Only the process groups `make services` recorded, and only while the recorded process is still the one
# started (a reused process id is left alone): SIGTERM, up to 30 s to go, then SIGKILL.
stop:
	@for name in mlflow ray; do f=$(RUNS)/$$name.pid; test -f $$f || continue; pid=$$(cat $$f); \
		if ps -ww -o args= -p $$pid 2>/dev/null | grep -q -e "mlflow server" -e "ray start"; then kill -TERM -$$pid; \
			for i in $$(seq 30); do kill -0 -$$pid 2>/dev/null || break; sleep 1; done; \
			kill -KILL -$$pid 2>/dev/null; echo "stopped $$name (process group $$pid)"; fi; rm -f $$f; done
	@# A head ended by a signal leaves its record (what `ray stop` removes): ray.init() and Ray's state API would
	@# go on trying it (trainers/ray_train.py: init_ray). Removed when it names this head and nothing answers.
	@r=$${RAY_TMPDIR:-$${TMPDIR:-/tmp}}/ray/ray_current_cluster; if grep -qsx '127.0.0.1:6379' $$r && ! curl -s -o /dev/null $(RAY_DASHBOARD); \
		then rm -f $$r; echo "removed the stopped head's record $$r"; fi

# Both tiers: the fast unit tests, then the integration tests (Ray, MLflow server, kills, sweeps).
# The fault suite's injected faults (-m slow, ~12 minutes) are `make test-faults`; CI runs both.
test: $(STAMP) postgres
	$(PY) -m pytest -q -m "not integration"
	$(PY) -m pytest -q -m "integration and not slow"

# PostgreSQL's server, for the integration test that tracks a multi-node sweep in it (tests/servers.py):
# Debian's package, installed when missing (root, or sudo).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# The fault suite (tests/faults/) through pytest: its injected faults (-m slow), printing its table.
# Alone, from the repo root: `.venv/bin/python -m tests.faults [--only bad|faults]`.
test-faults: $(STAMP)
	$(PY) -m pytest -q -s -m slow

# The performance figures of docs/performance.md (bench/, one script per question, ratios measured side by side):
# ~25 minutes on 2 CPU cores, run alone. On a CUDA machine sd_shape.py runs at Stable Diffusion 1.5 size.
bench: $(STAMP)
	$(PY) bench/step_overhead.py
	$(PY) bench/anchor_lora.py
	$(PY) bench/feedback_cost.py
	$(PY) bench/eval_speed.py
	$(PY) bench/sd_shape.py --compile off
	$(PY) bench/sweep_overhead.py --trials 3

# Re-create assets/digits (~30 minutes on 2 CPU cores), then assets/digits-t2i (~15) and assets/digits-flow (~14) from scratch.
assets: $(STAMP)
	$(VENV)/bin/acpo assets build --out assets/digits
	$(VENV)/bin/acpo assets build-t2i --out assets/digits-t2i
	$(VENV)/bin/acpo assets build-flow --out assets/digits-flow

clean:
	rm -rf $(VENV) runs .pytest_cache
