#!/usr/bin/env bash
# Makes target/pyenv: a virtual environment with tools/python-requirements.txt
# (maturin, pytest, numpy, Flower) and this checkout's `svp` Python package
# (crates/svp-py, built in release by maturin), and builds the release `svp`
# binary beside it. Needs python3 with venv and pip. Run again after changes.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyenv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tools/python-requirements.txt
cargo build --release --locked -p svp-cli
VIRTUAL_ENV="$PWD/$venv" "$venv/bin/maturin" develop --release --locked --quiet -m crates/svp-py/Cargo.toml
