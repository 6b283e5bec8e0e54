#!/usr/bin/env bash
# Tests the Python bindings (crates/svp-py) and the fleet app (fleet/) with
# pytest in target/pyenv (made by tools/python-env.sh), against this
# checkout's release `svp` binary: the tests compare the two, and make their
# models with it.
#   tools/test-python.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

tools/python-env.sh
SVP_BIN="$PWD/target/release/svp" target/pyenv/bin/python -m pytest crates/svp-py/tests fleet/tests -q "$@"
