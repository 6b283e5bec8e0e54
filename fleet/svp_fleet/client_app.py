"""The ClientApp: fine-tune the global model on this node's own shard and
send back the update.

A node says which shard is its own with its node config
(`flower-supernode --node-config "partition-id=0 num-partitions=10"`).
Two faults can be set there, to test the server: `fault="wrong-shape"` sends
an update of the wrong shape; `die-in-round=N` kills this node's whole
process group (SuperNode and ClientApp) with SIGKILL once round N's training
has begun, as a device losing power mid-round would.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import svp

from . import codec, shards

app = ClientApp()


@lru_cache(maxsize=2)
def own_shard(data: str, clients: int, partition_id: int, scheme: str, seed: int, k: int, alpha: float):
    """This node's training images and labels (the split is the same on every node)."""
    (x, y), _ = svp.load_data(data or None)
    parts = shards.partition(y, clients, scheme, seed, classes_per_client=k, alpha=alpha)
    mine = parts[partition_id]
    return x[mine], y[mine]


def global_model(context: Context, msg: Message) -> tuple[svp.Model, list[np.ndarray]]:
    """The start model with the weights the server sent."""
    model = svp.Model.load(str(context.run_config["model"]))
    arrays = msg.content["arrays"]
    weights = [arrays[name].numpy() for name in model.weight_names()]
    model.set_weights(weights)
    return model, weights


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, node = context.run_config, context.node_config
    started = time.perf_counter()
    if int(node.get("die-in-round", 0)) == int(msg.content["config"]["server-round"]):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    model, before = global_model(context, msg)
    x, y = own_shard(
        str(run["data"]),
        int(node["num-partitions"]),
        int(node["partition-id"]),
        str(run["partition"]),
        int(run["seed"]),
        int(run["classes-per-client"]),
        float(run["alpha"]),
    )
    report = model.finetune(
        x,
        y,
        epochs=int(run["local-epochs"]),
        method=str(run["method"]),
        batch_size=int(run["batch-size"]),
        lr=float(run["lr"]),
    )
    deltas = [after - b for after, b in zip(model.get_weights(), before)]
    names = model.weight_names()
    if node.get("fault") == "wrong-shape":
        deltas[0] = deltas[0][:-1]
    arrays = codec.encode(names, deltas, str(run["update-dtype"]))
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "partition-id": int(node["partition-id"]),
            "train-loss": float(report["epochs"][-1]["train_loss"]),
            "update-bytes": codec.payload_bytes(arrays),
            # Linux reports KiB.
            "peak-rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - started,
        }
    )
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)
