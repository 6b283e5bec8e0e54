"""svp.Model against the svp command: the same predictions, files and
fine-tuned weights, bit for bit; and clear errors for bad input."""

import json

import numpy as np
import pytest

import svp
from conftest import run_svp, same_weights


def test_load_data_gives_the_embedded_subset(data):
    (x_train, y_train), (x_test, y_test) = data
    assert x_train.shape == (6000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (1000, 28, 28) and y_test.shape == (1000,)
    assert sorted(set(y_train.tolist())) == list(range(10))
    assert 60 < x_train.mean() < 90  # Fashion-MNIST's mean pixel is about 73


def test_load_data_names_a_missing_folder(tmp_path):
    with pytest.raises(svp.SvpError, match="no-such-folder"):
        svp.load_data(tmp_path / "no-such-folder")


@pytest.mark.parametrize("which", ["mlp_file", "cnn_file"])
def test_evaluate_and_exits_match_svp_eval(svp_bin, request, data, which):
    path = request.getfixturevalue(which)
    _, (x_test, y_test) = data
    cli = json.loads(run_svp(svp_bin, "eval", path, "--data", "embedded", "--json", "--exits"))
    model = svp.Model.load(path)
    ours = model.evaluate(x_test, y_test)
    assert ours["samples"] == cli["samples"] == 1000
    assert ours["accuracy"] == cli["test_acc"]
    assert 0.0 < ours["loss"] < 3.0
    for k, accuracy in enumerate(cli["exit_test_acc"], start=1):
        assert np.mean(model.predict(x_test, exit=k) == y_test) == accuracy, f"exit {k}"
    assert np.array_equal(model.predict(x_test, exit=model.layers), model.predict(x_test))


def test_every_image_layout_and_float_pixels_predict_alike(mlp_file, data):
    model = svp.Model.load(mlp_file)
    x = data[1][0][:300]
    logits = model.logits(x)
    assert logits.shape == (300, 10) and logits.dtype == np.float32
    assert np.array_equal(model.logits(x.reshape(300, 784)), logits)
    assert np.array_equal(model.logits(x[:, None]), logits)
    assert np.array_equal(model.logits(np.asfortranarray(x)), logits)  # not contiguous in C order
    as_float = model.logits(x.astype(np.float32) / 255)
    np.testing.assert_allclose(as_float, logits, rtol=0, atol=1e-4)
    assert np.array_equal(model.predict(x), logits.argmax(axis=1))


def test_save_and_to_bytes_write_what_svp_export_writes(svp_bin, mlp_file, tmp_path):
    model = svp.Model.load(mlp_file)
    assert model.to_bytes() == mlp_file.read_bytes()
    model.save(tmp_path / "copy.svpm")
    assert (tmp_path / "copy.svpm").read_bytes() == mlp_file.read_bytes()
    for dtype in ["f16", "bf16", "int8"]:
        run_svp(svp_bin, "export", mlp_file, "--dtype", dtype, "--out", tmp_path / f"{dtype}.svpm")
        model.save(tmp_path / f"ours-{dtype}.svpm", dtype=dtype)
        assert (tmp_path / f"ours-{dtype}.svpm").read_bytes() == (tmp_path / f"{dtype}.svpm").read_bytes()
        assert model.to_bytes(dtype) == (tmp_path / f"{dtype}.svpm").read_bytes()
    small = svp.Model.load(tmp_path / "int8.svpm")
    assert small.dtype == "int8" and small.nbytes < model.nbytes / 3.5
    assert model.dtype == "f32", "saving as int8 leaves the model itself as it was"


def test_bad_files_and_paths_raise_one_clear_error(mlp_file, tmp_path):
    raw = mlp_file.read_bytes()
    with pytest.raises(svp.SvpError, match="not a valid svp model file"):
        svp.Model.from_bytes(raw[:1000])
    damaged = bytearray(raw)
    damaged[-5] ^= 0x40
    with pytest.raises(svp.SvpError, match="not a valid svp model file"):
        svp.Model.from_bytes(bytes(damaged))
    with pytest.raises(OSError, match="missing.svpm"):
        svp.Model.load(tmp_path / "missing.svpm")
    with pytest.raises(OSError, match="no-folder"):
        svp.Model.from_bytes(raw).save(tmp_path / "no-folder" / "m.svpm")
    with pytest.raises(ValueError, match="give f32, f16, bf16 or int8"):
        svp.Model.from_bytes(raw).to_bytes("f64")


def test_bad_arrays_raise_one_clear_error(mlp_file, data):
    model = svp.Model.load(mlp_file)
    (x, y), _ = data
    with pytest.raises(ValueError, match=r"shape \[5, 27, 28\]; the model takes 28x28 images"):
        model.predict(x[:5, :27])
    with pytest.raises(TypeError, match="uint8 pixels .* or of float32"):
        model.predict(x[:5].astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        model.predict([[0] * 784])
    with pytest.raises(ValueError, match="has 4 labels for 5 images"):
        model.evaluate(x[:5], y[:4])
    with pytest.raises(ValueError, match=r"y\[2\] = 10, but the model has classes 0 to 9"):
        model.evaluate(x[:3], np.array([1, 2, 10]))
    with pytest.raises(TypeError, match="integer labels"):
        model.evaluate(x[:3], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="exits 1 to 3 and its head, 4"):
        model.predict(x[:3], exit=5)


# The fine-tuning cases below each run the svp command and the bindings on
# the same data and compare the weights they leave, bit for bit.
FINETUNE_CASES = [
    ("mlp_file", ["--method", "svp", "--augment-shift", "1"], dict(method="svp", augment_shift=1)),
    ("mlp_file", ["--method", "bp", "--train-from-layer", "3"], dict(method="bp", train_from_layer=3)),
    ("cnn_file", ["--augment-flip", "--batch-size", "100"], dict(augment_flip=True, batch_size=100)),
]


@pytest.mark.parametrize("which,cli_args,kwargs", FINETUNE_CASES)
def test_finetune_gives_the_weights_svp_finetune_gives(svp_bin, request, data, tmp_path, which, cli_args, kwargs):
    path = request.getfixturevalue(which)
    (x, y), _ = data
    out = tmp_path / "tuned.svpm"
    run_svp(svp_bin, "finetune", path, "--data", "embedded", "--limit-train", 700, "--epochs", 2, *cli_args,
            "--out", out)
    model = svp.Model.load(path)
    report = model.finetune(x[:700], y[:700], epochs=2, **kwargs)
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["epochs"][0]["test_acc"] is None  # no test set given
    tuned = svp.Model.load(out)
    assert same_weights(model, tuned)
    assert model.method == tuned.method == report["method"]


def test_finetune_recovers_inverted_images_and_partial_training_saves_memory(mlp_file, data):
    """A camera whose images come inverted (255 - pixel): the model trained on
    the originals falls apart, and fine-tuning on the new images recovers it."""
    (x, y), (x_test, y_test) = data
    x_inv, x_test_inv = 255 - x, 255 - x_test
    results = {}
    for from_layer in [1, 3]:
        model = svp.Model.load(mlp_file)
        before = model.evaluate(x_test_inv, y_test)["accuracy"]
        report = model.finetune(x_inv, y, epochs=2, train_from_layer=from_layer,
                                x_test=x_test_inv, y_test=y_test)
        after = model.evaluate(x_test_inv, y_test)["accuracy"]
        assert report["epochs"][-1]["test_acc"] == after
        results[from_layer] = (before, after, report)
    before, after, full = results[1]
    assert before < 0.35, before
    assert after > before + 0.20, (before, after)
    _, after_top, top = results[3]
    assert after_top > before + 0.10, (before, after_top)
    # Layers 1 and 2 of 4 hold no optimizer state or gradients when frozen.
    assert top["optimizer_bytes"] < full["optimizer_bytes"] / 2
    assert top["param_bytes"] == full["param_bytes"]


def test_finetune_keep_best_keeps_the_best_validation_epoch(mlp_file, data):
    (x, y), _ = data
    model = svp.Model.load(mlp_file)
    report = model.finetune(x[:2000], y[:2000], epochs=3, lr=3e-3, val_split=0.25, keep="best")
    val = [e["val_acc"] for e in report["epochs"]]
    assert all(v is not None for v in val)
    assert report["kept_epoch"] == 1 + int(np.argmax(val))


def test_finetune_is_deterministic_and_widens_an_int8_model(mlp_file, data, tmp_path):
    (x, y), (x_test, y_test) = data
    svp.Model.load(mlp_file).save(tmp_path / "q.svpm", dtype="int8")
    a, b = svp.Model.load(tmp_path / "q.svpm"), svp.Model.load(tmp_path / "q.svpm")
    before = a.evaluate(x_test, y_test)["accuracy"]
    for m in (a, b):
        m.finetune(x[:1500], y[:1500], epochs=1)
    assert same_weights(a, b)
    assert a.dtype == "f32"
    assert a.evaluate(x_test, y_test)["accuracy"] > before


def test_finetune_rejects_bad_arguments_and_leaves_the_model_as_it_was(mlp_file, data):
    (x, y), (x_test, y_test) = data
    model = svp.Model.load(mlp_file)
    before = model.get_weights()
    cases = [
        (TypeError, "training takes uint8 pixels", dict(x=x[:100].astype(np.float32) / 255)),
        (ValueError, "keep=\"best\" needs val_split", dict(keep="best")),
        (ValueError, "train_from_layer=9: the model has layers 1 to 4", dict(train_from_layer=9)),
        (ValueError, "method \"sgd\"", dict(method="sgd")),
        (ValueError, "give both x_test and y_test", dict(x_test=x_test)),
        (ValueError, "val_split=1.5", dict(val_split=1.5)),
        (ValueError, "epochs and batch_size must be at least 1", dict(epochs=0)),
        (ValueError, r"augment.shift = 30 would move a 28x28 image out of sight", dict(augment_shift=30)),
    ]
    for error, message, kwargs in cases:
        args = dict(x=x[:100], y=y[:100])
        args.update(kwargs)
        with pytest.raises(error, match=message):
            model.finetune(args.pop("x"), args.pop("y"), **args)
    assert all(np.array_equal(p, q) for p, q in zip(before, model.get_weights()))


@pytest.mark.parametrize("which", ["mlp_file", "cnn_file"])
def test_weights_round_trip_and_average(request, data, which):
    path = request.getfixturevalue(which)
    x = data[1][0][:200]
    model = svp.Model.load(path)
    weights = model.get_weights()
    assert len(weights) == len(model.weight_names())
    assert all(w.dtype == np.float32 for w in weights)
    logits = model.logits(x)
    model.set_weights(weights)
    assert np.array_equal(model.logits(x), logits)
    # What a federated server does: the mean of two clients' weights.
    other = svp.Model.load(path)
    other.finetune(data[0][0][:500], data[0][1][:500], epochs=1)
    mean = [(a + b) / 2 for a, b in zip(weights, other.get_weights())]
    model.set_weights(mean)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), mean))


def test_set_weights_sets_what_the_network_computes(mlp_file, data):
    model = svp.Model.load(mlp_file)
    assert model.weight_names()[:4] == ["layer1.weight", "layer1.bias", "layer1.gamma", "layer1.beta"]
    zeros = [np.zeros_like(w) for w in model.get_weights()]
    zeros[-1][7] = 1.0  # the head's bias: every image is class 7
    model.set_weights(zeros)
    assert (model.predict(data[1][0][:50]) == 7).all()


def test_set_weights_rejects_what_does_not_fit(mlp_file):
    model = svp.Model.load(mlp_file)
    weights = model.get_weights()
    with pytest.raises(ValueError, match="got 13 arrays; the model has 14"):
        model.set_weights(weights[:-1])
    bad = list(weights)
    bad[4] = np.zeros((1024, 1023), np.float32)
    with pytest.raises(ValueError, match=r"layer2.weight has shape \[1024, 1023\]; the model's is \[1024, 1024\]"):
        model.set_weights(bad)
    bad[4] = weights[4].astype(np.float64)
    with pytest.raises(TypeError, match="layer2.weight: give a float32 numpy array"):
        model.set_weights(bad)
    bad[4] = weights[4].copy()
    bad[4][0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        model.set_weights(bad)
    assert all(np.array_equal(p, q) for p, q in zip(weights, model.get_weights()))


def test_quantizers_are_the_model_files(mlp_file, tmp_path):
    model = svp.Model.load(mlp_file)
    for dtype in ["f16", "int8"]:
        model.save(tmp_path / f"{dtype}.svpm", dtype=dtype)
        stored = svp.Model.load(tmp_path / f"{dtype}.svpm").get_weights()
        for name, w, s in zip(model.weight_names(), model.get_weights(), stored):
            if not name.endswith(".weight"):
                continue  # files keep biases and norms in f32
            q, scales = svp.quantize(w, dtype)
            assert q.dtype == (np.float16 if dtype == "f16" else np.int8) and q.shape == w.shape
            assert (scales is None) == (dtype == "f16")
            if scales is not None:
                assert scales.shape == (w.shape[0],)
            assert np.array_equal(svp.dequantize(q, scales), s), f"{dtype} {name}"
    with pytest.raises(ValueError, match="needs its scales"):
        svp.dequantize(np.zeros(3, np.int8))
    with pytest.raises(ValueError, match="2 scales for 3 rows of 4"):
        svp.dequantize(np.zeros((3, 4), np.int8), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="give \"f16\" or \"int8\""):
        svp.quantize(np.zeros(3, np.float32), "bf16")
