"""The fleet app: its splits and update codec, and whole federations over
loopback with Flower's deployment engine (SuperLink, SuperNodes, flwr run)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import svp

FLEET = pathlib.Path(__file__).resolve().parents[1]
ROOT = FLEET.parent
sys.path.insert(0, str(FLEET))

from svp_fleet import codec, shards  # noqa: E402

# A small MLP, so that a federation round takes seconds.
SMALL_MLP = """
[model]
hidden = [128, 128]
norm = "layernorm"

[train]
method = "svp"
epochs = 1
batch_size = 64
seed = 5

[optimizer]
kind = "adam"
lr = 1e-3

[schedule]
kind = "cosine"
warmup_steps = 0
"""


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """The common start: the small MLP after one epoch on 300 images."""
    svp_bin = pathlib.Path(os.environ.get("SVP_BIN", ROOT / "target" / "release" / "svp"))
    if not svp_bin.is_file():
        message = f"the svp binary is not at {svp_bin} (cargo build --release -p svp-cli, or set SVP_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("fleet")
    (folder / "small.toml").write_text(SMALL_MLP)
    out = folder / "start.svpm"
    subprocess.run(
        [svp_bin, "train", "--data", "embedded", "--config", folder / "small.toml", "--limit-train", "300",
         "--out", out],
        check=True, capture_output=True,
    )
    return out


def federate(start, tmp_path, *args):
    """Runs run_loopback.py; returns the server's history and the global model path."""
    out = tmp_path / "global.svpm"
    done = subprocess.run(
        [sys.executable, FLEET / "run_loopback.py", "--model", start, "--out", out,
         "--workdir", tmp_path / "logs", "--timeout", "600", *map(str, args)],
        capture_output=True, text=True,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr + logs
    return json.loads(out.with_suffix(".json").read_text())["rounds"], out, logs


@pytest.mark.parametrize("scheme", shards.SCHEMES)
def test_partitions_are_disjoint_complete_and_seeded(scheme):
    labels = svp.load_data()[0][1]
    parts = shards.partition(labels, 10, scheme, seed=3)
    everything = np.concatenate(parts)
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)
    again = shards.partition(labels, 10, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = shards.partition(labels, 10, scheme, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    classes = [len(np.unique(labels[p])) for p in parts]
    if scheme == "classes":
        # 20 shards of 300 sorted samples: a shard can straddle two classes.
        assert all(len(p) == 600 for p in parts) and max(classes) <= 4 and np.mean(classes) <= 3
    if scheme == "iid":
        assert min(classes) == 10


def test_partition_rejects_what_cannot_be_split():
    labels = np.arange(5) % 2
    with pytest.raises(ValueError, match="5 samples cannot be split among 6 clients"):
        shards.partition(labels, 6)
    with pytest.raises(ValueError, match="give one of classes, dirichlet, iid"):
        shards.partition(labels, 2, "zipf")


def test_updates_round_trip_within_each_encoding():
    rng = np.random.default_rng(0)
    names = ["layer1.weight", "layer1.bias"]
    deltas = [rng.normal(0, 1e-3, (64, 784)).astype(np.float32), rng.normal(0, 1e-3, 64).astype(np.float32)]
    shapes = [d.shape for d in deltas]
    sizes = {}
    for dtype, tolerance in [("f32", 0.0), ("f16", 1e-3), ("int8", 0.5 / 127)]:
        arrays = codec.encode(names, deltas, dtype)
        sizes[dtype] = codec.payload_bytes(arrays)
        back = codec.decode(arrays, names, shapes)
        for d, b in zip(deltas, back):
            scale = np.abs(d).max(axis=-1, keepdims=True) if dtype == "int8" else np.abs(d)
            # f16 below 2^-14 is subnormal: steps of 2^-24 there.
            floor = 2.0**-25 if dtype == "f16" else 1e-12
            assert np.all(np.abs(d - b) <= tolerance * scale * 1.0001 + floor), dtype
    assert sizes["f16"] == sizes["f32"] // 2
    assert sizes["int8"] == sizes["f32"] // 4 + 4 * (64 + 1)  # one scale per row


def test_updates_that_do_not_fit_are_rejected_with_the_reason():
    names, shapes = ["a", "b"], [(2, 3), (3,)]
    good = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    cases = [
        ({"a": good["a"]}, "missing b"),
        ({**good, "c": good["b"]}, "unexpected c"),
        ({**good, "a": np.zeros((3, 2), np.float32)}, r"a has shape \[3, 2\], the model's is \[2, 3\]"),
        ({**good, "b": np.zeros(3, np.float64)}, "b is float64"),
        ({**good, "b": np.array([0, np.inf, 0], np.float32)}, "b holds a value that is not finite"),
        ({**good, "a": np.zeros((2, 3), np.int8)}, "missing a:scale"),
        ({**good, "a": np.zeros((2, 3), np.int8), "a:scale": np.ones(3, np.float32)}, "3 scales for 2 rows"),
    ]
    for arrays, reason in cases:
        with pytest.raises(codec.UpdateRejected, match=reason):
            codec.decode(arrays, names, shapes)


def test_two_clients_two_rounds_improve_the_global_model(start_model, tmp_path):
    rounds, out, _ = federate(start_model, tmp_path, "--clients", 2, "--rounds", 2)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failed"] == 0 and r["rejected"] == 0 for r in rounds[1:])
    assert rounds[1]["samples"] == 6000  # the two shards are the whole training set
    model = svp.Model.load(out)
    _, (x_test, y_test) = svp.load_data()
    accuracy = model.evaluate(x_test, y_test)["accuracy"]
    assert accuracy == rounds[-1]["test-acc"]
    assert accuracy > rounds[0]["test-acc"] + 0.10, [r["test-acc"] for r in rounds]


def test_a_federation_is_repeatable_to_the_bit(start_model, tmp_path):
    # Three clients, so that the order of the server's sum could matter: it
    # sums in partition order, whatever order the replies arrive in.
    runs = [federate(start_model, tmp_path / str(i), "--clients", 3, "--rounds", 1)[1] for i in range(2)]
    assert runs[0].read_bytes() == runs[1].read_bytes()


def test_a_faulty_client_is_rejected_and_a_lost_one_does_not_stop_the_round(start_model, tmp_path):
    rounds, out, logs = federate(
        start_model, tmp_path, "--clients", 4, "--rounds", 2, "--min-clients", 2, "--update-dtype", "int8",
        "--faulty-client", 1, "--kill-client", 3, "--kill-in-round", 2, "--round-timeout", 120,
    )
    assert (rounds[1]["clients"], rounds[1]["rejected"], rounds[1]["failed"]) == (3, 1, 0)
    assert (rounds[2]["clients"], rounds[2]["rejected"], rounds[2]["failed"]) == (2, 1, 1)
    assert "layer1.weight has shape [127, 784], the model's is [128, 784]" in logs
    assert "did not answer" in logs
    # int8 updates: a quarter of f32's bytes, plus the scales.
    f32_bytes = sum(w.nbytes for w in svp.Model.load(start_model).get_weights())
    assert rounds[1]["update-bytes-per-client"] < f32_bytes / 3.9
    assert svp.Model.load(out).evaluate(*svp.load_data()[1])["accuracy"] == rounds[-1]["test-acc"]
