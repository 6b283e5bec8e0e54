"""Fixtures: model files trained by the `svp` command, and the embedded data.

The tests compare the bindings against the command line, so they need its
release binary: `SVP_BIN`, or `target/release/svp` of this checkout. Without
it they are skipped, except under CI (`CI=true`), where that is a failure.
"""

import os
import pathlib
import subprocess

import numpy as np
import pytest

import svp

ROOT = pathlib.Path(__file__).resolve().parents[3]

SMALL_CNN = """
[model]
conv = [8, "M", 16, "M"]
hidden = []
conv_readout = 2

[svp]
layers_per_unit = 1

[train]
method = "svp"
epochs = 1
batch_size = 64
seed = 3

[optimizer]
kind = "adam"
lr = 1e-3

[schedule]
kind = "cosine"
warmup_steps = 0
"""


@pytest.fixture(scope="session")
def svp_bin():
    path = pathlib.Path(os.environ.get("SVP_BIN", ROOT / "target" / "release" / "svp"))
    if not path.is_file():
        message = f"the svp binary is not at {path} (cargo build --release -p svp-cli, or set SVP_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_svp(svp_bin, *args):
    """Runs the svp command; returns its stdout (fails the test on a non-zero exit)."""
    done = subprocess.run([str(svp_bin), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, f"svp {' '.join(map(str, args))}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def data():
    return svp.load_data()


@pytest.fixture(scope="session")
def mlp_file(svp_bin, tmp_path_factory):
    """The reference MLP (3 x 1024, LayerNorm), SVP, 1 epoch on the embedded data."""
    out = tmp_path_factory.mktemp("models") / "mlp.svpm"
    run_svp(svp_bin, "train", "--data", "embedded", "--epochs", 1, "--out", out)
    return out


@pytest.fixture(scope="session")
def cnn_file(svp_bin, tmp_path_factory):
    """A two-block CNN, SVP, 1 epoch on 1,024 embedded images."""
    folder = tmp_path_factory.mktemp("models")
    config = folder / "cnn.toml"
    config.write_text(SMALL_CNN)
    out = folder / "cnn.svpm"
    run_svp(svp_bin, "train", "--data", "embedded", "--config", config, "--limit-train", 1024, "--out", out)
    return out


def same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))
