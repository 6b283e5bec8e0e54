"""The ServerApp: FedAvg over svp model updates, starting from a model file
and rewriting the global model file (atomically) after every round."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import svp

from . import codec

app = ServerApp()


def write_json_atomically(path: Path, value) -> None:
    """The file holds the old text or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


class SvpFedAvg(FedAvg):
    """FedAvg (weighted by each client's sample count) over the updates of
    svp clients: each update is checked against the model's tensor names
    and shapes first, and one that does not fit is left out with a logged
    reason. After each round the global model is written to `out`."""

    def __init__(self, model: svp.Model, out: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.out = out
        self.names = model.weight_names()
        self.shapes = [w.shape for w in model.get_weights()]
        self.current: list[np.ndarray] = []
        self.rounds: list[dict] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = [arrays[name].numpy() for name in self.names]
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[tuple[float, list[np.ndarray], MetricRecord]] = []
        failed = rejected = 0
        for msg in replies:
            if msg.has_error():
                # (An error the SuperLink made for a lost node names no client.)
                failed += 1
                log(WARNING, "round %d: a client did not answer: %s", server_round, msg.error.reason)
                continue
            node = msg.metadata.src_node_id
            try:
                arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
                deltas = codec.decode(arrays, self.names, self.shapes)
                metrics = msg.content["metrics"]
                weight = float(metrics["num-examples"])
                if not weight > 0:
                    raise codec.UpdateRejected(f"num-examples = {weight}")
            except (codec.UpdateRejected, KeyError) as e:
                rejected += 1
                log(WARNING, "round %d: rejected the update of node %d: %s", server_round, node, e)
                continue
            accepted.append((weight, deltas, metrics))
        if len(accepted) < max(self.min_train_nodes, 1):
            log(
                WARNING,
                "round %d: %d usable updates, fewer than the %d needed; the global model is unchanged",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        # Replies arrive in whatever order the clients finish; summing in
        # partition order makes a federation repeatable to the bit.
        accepted.sort(key=lambda a: int(a[2]["partition-id"]) if "partition-id" in a[2] else -1)
        total = sum(w for w, _, _ in accepted)
        new = []
        for i, current in enumerate(self.current):
            mean = sum((w / total) * deltas[i].astype(np.float64) for w, deltas, _ in accepted)
            new.append((current + mean).astype(np.float32))
        self.model.set_weights(new)
        self.model.save(self.out)
        summary = {
            "round": server_round,
            "clients": len(accepted),
            "failed": failed,
            "rejected": rejected,
            "samples": int(total),
            "train-loss": sum(w * float(m["train-loss"]) for w, _, m in accepted) / total,
            "update-bytes-per-client": float(np.mean([float(m["update-bytes"]) for _, _, m in accepted])),
            "client-peak-rss-mib": max(float(m["peak-rss-mib"]) for _, _, m in accepted),
            "client-seconds": max(float(m["seconds"]) for _, _, m in accepted),
        }
        self.rounds.append(summary)
        log(INFO, "round %d: averaged %d updates; global model written to %s", server_round, len(accepted), self.out)
        record = ArrayRecord({name: Array(w) for name, w in zip(self.names, new)})
        return record, MetricRecord({k: v for k, v in summary.items() if k != "round"})


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    model = svp.Model.load(str(run["model"]))
    out = Path(str(run["out"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    history_path = out.with_suffix(".json")
    _, (x_test, y_test) = svp.load_data(str(run["data"]) or None)
    min_clients = int(run["min-clients"])
    strategy = SvpFedAvg(
        model,
        out,
        fraction_evaluate=0.0,
        min_train_nodes=min_clients,
        min_available_nodes=min_clients,
    )
    history: dict = {"config": dict(run), "rounds": []}
    started = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global model on the server's test set, after each round (0: the start)."""
        model.set_weights([arrays[name].numpy() for name in strategy.names])
        result = model.evaluate(x_test, y_test)
        entry = {"round": server_round, "test-acc": result["accuracy"], "test-loss": result["loss"]}
        entry["seconds"] = time.perf_counter() - started
        # What the clients did in this round, if its updates were averaged.
        entry.update(next((r for r in strategy.rounds if r["round"] == server_round), {}))
        history["rounds"].append(entry)
        write_json_atomically(history_path, history)
        return MetricRecord({"test-acc": result["accuracy"], "test-loss": result["loss"]})

    initial = ArrayRecord({name: Array(w) for name, w in zip(strategy.names, model.get_weights())})
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(run["num-server-rounds"]),
        timeout=float(run["round-timeout"]),
        evaluate_fn=evaluate,
    )
