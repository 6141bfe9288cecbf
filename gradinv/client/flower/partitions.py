"""Which pool images each client of the embedded federation holds: small partitions, as
cross-device clients have, drawn without overlap, IID or by class."""

from __future__ import annotations

import torch

from gradinv.errors import UserError

SPLITS = ("iid", "by_class")


def client_partitions(labels: torch.Tensor, sizes: list[int], split: str, seed: int) -> list[torch.Tensor]:
    """Disjoint pool indices, one tensor per client, of the given sizes. `by_class` gives each
    client the classes of a contiguous share of a seeded class order, so clients see few classes."""
    if split not in SPLITS:
        raise UserError(f"params: 'federation.split' must be one of {', '.join(SPLITS)}, got {split!r}.")
    if sum(sizes) > len(labels):
        raise UserError(f"params: 'federation.client_sizes' add up to {sum(sizes)} examples, more than the pool's "
                        f"{len(labels)}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    if split == "by_class":
        classes = labels.unique()[torch.randperm(len(labels.unique()), generator=generator)]
        rank = torch.empty(int(labels.max()) + 1, dtype=torch.long)
        rank[classes] = torch.arange(len(classes))
        order = order[torch.argsort(rank[labels[order]], stable=True)]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return [order[int(a):int(b)] for a, b in zip(starts[:-1], starts[1:])]
