#!/usr/bin/env python3
"""Runs a federation on this machine over loopback with Flower's deployment
engine: one SuperLink and N SuperNodes, every one bound to 127.0.0.1, and the
svp fleet app on them with `flwr run`. Stops everything it started, also when
it fails or is interrupted.

    python fleet/run_loopback.py --clients 2 --rounds 2 \\
        --model models/device-mlp.svpm --out runs/fleet/global.svpm

The server writes the global model after every round to --out and the
per-round history (test accuracy, update bytes, client memory) beside it as
JSON; logs of every process go to --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FLEET = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


class Processes:
    """Started processes, each in its own session, stopped as a group."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir = env, workdir
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        p = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=dict(self.env, **env), start_new_session=True
        )
        self.started[name] = p
        return p

    def stop_all(self) -> None:
        for p in self.started.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in self.started.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def toml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, default=Path("models/device-mlp.svpm"), help="the start model")
    ap.add_argument("--out", type=Path, default=Path("runs/fleet/global.svpm"), help="the global model")
    ap.add_argument("--data", default="", help="IDX data folder (default: svp's embedded subset)")
    ap.add_argument("--method", choices=["svp", "bp"], default="svp")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--update-dtype", choices=["f32", "f16", "int8"], default="f32")
    ap.add_argument("--partition", choices=["classes", "dirichlet", "iid"], default="classes")
    ap.add_argument("--classes-per-client", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--min-clients", type=int, help="rounds go on with this many answers (default: all clients)")
    ap.add_argument("--threads-per-client", type=int, default=1,
                    help="compute threads of each client (all clients share this machine's cores)")
    ap.add_argument("--round-timeout", type=float, default=300)
    ap.add_argument("--faulty-client", type=int, help="this client sends updates of the wrong shape")
    ap.add_argument("--kill-client", type=int,
                    help="this client's SuperNode and ClientApp are killed (SIGKILL) in --kill-in-round")
    ap.add_argument("--kill-in-round", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("runs/fleet/logs"), help="logs and Flower's home")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before the whole run is stopped")
    args = ap.parse_args()
    if args.clients < 1 or args.rounds < 1:
        ap.error("--clients and --rounds must be at least 1")
    if not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")

    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    out = args.out.resolve()
    history = out.with_suffix(".json")
    history.unlink(missing_ok=True)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(workdir / "flwr-home"))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    link_port = free_port()
    (workdir / "flwr-home").mkdir(exist_ok=True)
    (workdir / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_config = {
        "model": str(args.model.resolve()),
        "out": str(out),
        "data": str(Path(args.data).resolve()) if args.data else "",
        "num-server-rounds": args.rounds,
        "min-clients": args.min_clients or args.clients,
        "round-timeout": args.round_timeout,
        "method": args.method,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "update-dtype": args.update_dtype,
        "partition": args.partition,
        "classes-per-client": args.classes_per_client,
        "alpha": args.alpha,
        "seed": args.seed,
    }

    procs = Processes(env, workdir)
    try:
        link = procs.start(
            "superlink",
            [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
             "--disable-runtime-dependency-installation"],
        )
        wait_for_port(link_port, link, "the SuperLink", workdir / "superlink.log")
        for i in range(args.clients):
            node_config = f"partition-id={i} num-partitions={args.clients}"
            if i == args.faulty_client:
                node_config += ' fault="wrong-shape"'
            if i == args.kill_client:
                # The client kills its own process group once that round's
                # training has begun: mid-round, whatever the timing.
                node_config += f" die-in-round={args.kill_in_round}"
            port = free_port()
            node = procs.start(
                f"supernode-{i}",
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
                RAYON_NUM_THREADS=str(args.threads_per_client),
            )
            wait_for_port(port, node, f"SuperNode {i}", workdir / f"supernode-{i}.log")
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        print(f"svp fleet: {args.clients} clients, {args.rounds} rounds on 127.0.0.1:{link_port}; logs in {workdir}",
              file=sys.stderr)
        run = procs.start("flwr-run", [str(bin_dir / "flwr"), "run", str(FLEET), "loopback", "--stream",
                                       "--run-config", overrides])
        deadline = time.monotonic() + args.timeout
        while run.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the run took longer than {args.timeout:.0f} s; see {workdir / 'flwr-run.log'}")
            time.sleep(0.2)
        if run.returncode != 0:
            raise RuntimeError(f"flwr run exited with {run.returncode}; see {workdir / 'flwr-run.log'}")
        rounds = json.loads(history.read_text())["rounds"] if history.is_file() else []
        if len(rounds) != args.rounds + 1:
            raise RuntimeError(f"the server recorded {len(rounds)} of {args.rounds + 1} evaluations; "
                               f"see {workdir / 'flwr-run.log'}")
    except (RuntimeError, KeyboardInterrupt) as e:
        print(f"svp fleet: {e or 'interrupted'}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()

    for r in rounds:
        extra = ""
        if r["round"] > 0 and "clients" in r:
            extra = (f"  {r['clients']} clients ({r['failed']} failed, {r['rejected']} rejected)"
                     f"  update {r['update-bytes-per-client'] / 1e6:.2f} MB/client"
                     f"  client peak RSS {r['client-peak-rss-mib']:.0f} MiB")
        print(f"round {r['round']:3d}  test_acc {100 * r['test-acc']:.2f}%{extra}")
    print(f"global model: {out}; history: {history}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
