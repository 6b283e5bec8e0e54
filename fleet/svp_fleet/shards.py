"""Seeded splits of a training set among clients: the same seed gives every
client (each computing its own share) the same partition."""

from __future__ import annotations

import numpy as np

SCHEMES = ("classes", "dirichlet", "iid")


def partition(
    labels: np.ndarray,
    clients: int,
    scheme: str = "classes",
    seed: int = 0,
    classes_per_client: int = 2,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Indices of each client's samples (disjoint, sorted, covering `labels`).

    * "classes": the samples sorted by label are cut into
      `clients * classes_per_client` equal shards and each client gets
      `classes_per_client` shards at random (McMahan et al.'s pathological
      non-IID split): mostly that many classes per client.
    * "dirichlet": each class is divided among the clients in proportions
      drawn from Dirichlet(alpha): small alpha, skewed clients.
    * "iid": a random equal split.
    """
    if clients < 1:
        raise ValueError(f"clients={clients}: need at least one")
    n = len(labels)
    if n < clients:
        raise ValueError(f"{n} samples cannot be split among {clients} clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif scheme == "classes":
        if classes_per_client < 1:
            raise ValueError(f"classes-per-client={classes_per_client}: need at least one")
        # Shuffle first so that each shard's samples within a class are random.
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, clients * classes_per_client)
        picks = rng.permutation(len(shards)).reshape(clients, classes_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in picks]
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha={alpha}: must be positive")
        parts_lists: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                parts_lists[client].append(piece)
        parts = [np.concatenate(p) for p in parts_lists]
    else:
        raise ValueError(f"partition {scheme!r}: give one of {', '.join(SCHEMES)}")
    return [np.sort(p) for p in parts]
