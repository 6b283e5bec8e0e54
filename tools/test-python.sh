#!/usr/bin/env bash
# Builds the Python bindings (crates/svp-py) into a virtual environment with
# maturin and runs their tests and the fleet app's (fleet/) with pytest,
# against this checkout's release `svp` binary (the tests compare the two,
# and make their models with it). Needs python3 with venv and pip.
#   tools/test-python.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/python-requirements.txt
cargo build --release --locked -p svp-cli
VIRTUAL_ENV="$PWD/$venv" "$venv/bin/maturin" develop --release --locked --quiet -m crates/svp-py/Cargo.toml
SVP_BIN="$PWD/target/release/svp" "$venv/bin/python" -m pytest crates/svp-py/tests fleet/tests -q "$@"
