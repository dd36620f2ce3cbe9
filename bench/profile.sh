#!/usr/bin/env bash
# Profile model-proxy under the small-POST load with py-spy (installed into the venv if
# missing): bench/results/profile/{flamegraph.svg,stacks.txt,top.txt}. Run from the
# repository root; options are passed on (see: bash bench/profile.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m bench.profile "$@"
