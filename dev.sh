#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs the pinned project, then runs a command.
#   ./dev.sh demo    start the simulated stack and run the whole runbook through Prefect (exit 0 on success)
#   ./dev.sh test    lint, type-check and run the test suite (what CI runs)
#   ./dev.sh shell   print how to activate the environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml devtools/pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade "pip==26.3"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" -e ./devtools
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The real-LiteLLM test tier's own environment (tests/litellm_proxy/), for `test` only: the exact package set of
# litellm[proxy]==1.108.7, installed without resolving, re-made when its requirements file changes.
litellm_env() {
  local req=tests/litellm_proxy/requirements-litellm-proxy.txt
  local stamp=.venv-litellm/.installed-$(sha256sum "$req" | cut -c1-16)
  if [ ! -f "$stamp" ]; then
    rm -rf .venv-litellm
    "$PY" -m venv .venv-litellm
    .venv-litellm/bin/python -m pip install -q --upgrade "pip==26.3"
    .venv-litellm/bin/python -m pip install -q --no-deps -r "$req"
    touch "$stamp"
  fi
}
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_CLI_PROMPT=false
cmd=${1:-help}
shift || true
case "$cmd" in
  demo)
    exec .venv/bin/coder-stack demo "$@" ;;
  test)
    litellm_env
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    # --durations: the slowest tests in every run's log, to keep the suite's time in check.
    # -n 2 --dist loadfile: two pytest-xdist workers, each with its own Prefect test server and simulated
    # clusters; a test file is never split between them, and files are handed out in collection order
    # (--no-loadscope-reorder), so the flow tier stays last in each worker (see tests/conftest.py). Most of the
    # suite waits (cold starts, heartbeats, a crash's 60 s of silence), so two workers on two cores take it from
    # about 28 to about 17 minutes. Extra arguments go to pytest: `./dev.sh test -n 0 tests/...` runs in one process.
    exec .venv/bin/pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile --no-loadscope-reorder "$@" ;;
  shell)
    echo "source $(pwd)/.venv/bin/activate" ;;
  *)
    echo "usage: ./dev.sh demo|test|shell" >&2; exit 2 ;;
esac
