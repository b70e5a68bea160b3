"""``ShardOptimizer`` on a one- and a two-device mesh: stepping plain aliases of the local shards
gives, for the elementwise torch optimizers, exactly what stepping the DTensor parameters gives
(the reference: DTensor's own sharding rules), state included and handed to checkpoints as
DTensors; on the larger mesh any other optimizer steps the DTensors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from runtime.optimizer import ELEMENTWISE_OPTIMIZERS, ShardOptimizer
from tests.distributed import DistributedWorkers

#: (shape, placement) of each parameter: sharded evenly, sharded unevenly (5 rows on 2 ranks),
#: sharded along dim 1, replicated (a data-parallel copy), and a vector.
LAYOUT: list[tuple[tuple[int, ...], Placement]] = [
    ((4, 3), Shard(0)),
    ((5, 2), Shard(0)),
    ((3, 6), Shard(1)),
    ((4, 4), Replicate()),
    ((7,), Replicate()),
]
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-6, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-2, momentum=0.5),
}


class NormalisedSGD(torch.optim.Optimizer):
    """p ← p − lr · g / ‖g‖, the norm over the whole tensor: not elementwise."""

    def __init__(self, params: list[nn.Parameter], lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad / p.grad.norm(), alpha=-group["lr"])


@pytest.fixture(scope="module", params=[1, 2], ids=["one-device", "two-device"])
def processes(request) -> Iterator[DistributedWorkers]:
    with DistributedWorkers(request.param) as group:
        yield group


@pytest.fixture(scope="module")
def two_processes() -> Iterator[DistributedWorkers]:
    with DistributedWorkers(2) as group:
        yield group


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    full = [t.full_tensor() if isinstance(t, DTensor) else t for t in (a, b)]
    return float((full[0] - full[1]).abs().max())


def paths_agree(name: str, steps: int) -> dict[str, object]:
    """On each rank: ``name``'s optimizer on the alias path and on the DTensor path from the
    same values with the same gradients (the gradients of a replicated parameter equal on both
    ranks, as after the data-parallel all-reduce); which path each took, the largest parameter
    and state differences, and the difference after a fresh alias optimizer loaded with the
    DTensor optimizer's state takes one more step."""
    mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    generator = torch.Generator().manual_seed(5)
    values = [torch.randn(shape, generator=generator) for shape, _ in LAYOUT]
    grads = [[torch.randn(v.shape, generator=generator) for v in values] for _ in range(steps)]
    make = OPTIMIZERS[name]

    def build(local: bool | None) -> ShardOptimizer:
        params = [
            nn.Parameter(distribute_tensor(v.clone(), mesh, [placement]))
            for v, (_, placement) in zip(values, LAYOUT, strict=True)
        ]
        return ShardOptimizer(make, params, local=local)

    def run(optimizer: ShardOptimizer, gradients: list[list[torch.Tensor]]) -> None:
        for step_grads in gradients:
            optimizer.zero_grad()
            for p, g in zip(optimizer.params, step_grads, strict=True):
                p.grad = distribute_tensor(g, mesh, p.placements)
            optimizer.step()

    chosen, dtensor = build(None), build(False)
    result: dict[str, object] = {"local": chosen.local, "dtensor_local": dtensor.local}
    run(chosen, grads)
    run(dtensor, grads)
    result["params"] = max(_gap(a, b) for a, b in zip(chosen.params, dtensor.params, strict=True))
    state_gap = 0.0
    for a, b in zip(chosen.params, dtensor.params, strict=True):
        sa, sb = chosen.state_of(a), dtensor.state_of(b)
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(value, DTensor) == isinstance(sb[key], DTensor), key
                assert value.ndim == 0 or isinstance(value, DTensor), (
                    key
                )  # checkpoints see DTensors
                state_gap = max(state_gap, _gap(value, sb[key]))
    result["state"] = state_gap
    if chosen.local:
        resumed = build(True)
        with torch.no_grad():
            for p, q in zip(resumed.params, dtensor.params, strict=True):
                p.to_local().copy_(q.to_local())
                resumed.load_state(p, {k: v.clone() for k, v in dtensor.state_of(q).items()})
        run(resumed, grads[:1])
        run(dtensor, grads[:1])
        result["resumed"] = max(
            _gap(a, b) for a, b in zip(resumed.params, dtensor.params, strict=True)
        )
    return result


def whole_tensor_update(steps: int) -> dict[str, object]:
    """On each rank: ``NormalisedSGD`` through ``ShardOptimizer`` on the two-device mesh, and
    on the full tensors in this process alone (the reference); which path it took, the largest
    parameter difference, and the error of requiring the alias path."""
    mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    generator = torch.Generator().manual_seed(7)
    values = [torch.randn(shape, generator=generator) for shape, _ in LAYOUT]
    grads = [[torch.randn(v.shape, generator=generator) for v in values] for _ in range(steps)]
    params = [
        nn.Parameter(distribute_tensor(v.clone(), mesh, [placement]))
        for v, (_, placement) in zip(values, LAYOUT, strict=True)
    ]
    optimizer = ShardOptimizer(NormalisedSGD, params)
    reference = [nn.Parameter(v.clone()) for v in values]
    alone = NormalisedSGD(reference)
    for step_grads in grads:
        optimizer.zero_grad()
        for p, q, g in zip(params, reference, step_grads, strict=True):
            p.grad = distribute_tensor(g, mesh, p.placements)
            q.grad = g.clone()
        optimizer.step()
        alone.step()
    try:
        ShardOptimizer(NormalisedSGD, params, local=True)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    return {
        "local": optimizer.local,
        "params": max(_gap(p, q) for p, q in zip(params, reference, strict=True)),
        "refused": refused,
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "rmsprop"])
def test_elementwise_optimizers_step_the_local_shards_exactly(processes, name):
    for result in processes.run(paths_agree, name, 3, timeout_s=100):
        assert result["local"] and not result["dtensor_local"]
        assert (result["params"], result["state"], result["resumed"]) == (0.0, 0.0, 0.0)


@pytest.mark.timeout(120)
def test_other_optimizers_step_whole_tensors_on_a_larger_mesh(two_processes):
    assert NormalisedSGD not in ELEMENTWISE_OPTIMIZERS
    for result in two_processes.run(whole_tensor_update, 3, timeout_s=100):
        assert not result["local"]
        assert result["params"] < 1e-6  # a per-shard norm would be off by tens of per cent
        assert "NormalisedSGD is not known to update each element on its own" in str(
            result["refused"]
        )
