"""The user's optimizer over one worker's parameter shards.

``ShardOptimizer`` builds the optimizer with the user's ``optimizer_fn`` and steps it after the
gradient synchronisation. Where it can, it steps plain ``nn.Parameter`` aliases of the
parameters' local tensors (same storage, so an update in place is an update of the DTensor
parameter): the step then runs torch's plain-tensor kernels, without DTensor's dispatch for
each of the dozen ops per parameter, which doubles a CPU worker's AdamW step
(``benchmarks/optimizer_step_local_vs_dtensor.py``). Before each step every alias receives its
parameter's accumulated gradient, the local tensor of a DTensor in the parameter's placement
(no copy). That is exact

* on a one-device mesh, where a local tensor is the whole value, for any optimizer;
* on any mesh for the optimizers of ``ELEMENTWISE_OPTIMIZERS``, whose update of an element
  reads only that element of the parameter, its gradient and its state (and scalars: the
  learning rate, the step count): each shard's update is then that shard of the whole
  tensor's update, and replicas, which hold equal values and gradients, stay equal.

Any other optimizer on a larger mesh (one that reads a whole tensor, as Adafactor's factored
moments or a layer-wise trust ratio do) steps the DTensor parameters themselves, where
DTensor's sharding rules keep such reductions global.

The optimizer state is the same either way as far as checkpoints see it: ``state_of`` gives a
parameter's state with every tensor of the parameter's local shape as a DTensor in the
parameter's placement (on the alias path, a DTensor view of the local moment), and
``load_state`` takes state in that form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from intra_op.apply import shard_as_dtensor

OptimizerFn = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
LRSchedulerFn = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


#: torch.optim classes that update each element from that element alone (module docstring).
ELEMENTWISE_OPTIMIZERS: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adagrad,
        torch.optim.Adamax,
        torch.optim.ASGD,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Rprop,
    }
)


class ShardOptimizer:
    """``optimizer_fn`` over ``params`` (DTensor parameters on one mesh), stepping plain aliases
    of their local tensors where that is exact (module docstring).

    ``local`` None chooses; True requires the alias path (``ValueError`` where it would not be
    exact); False steps the DTensor parameters. Choosing on a mesh of several devices builds
    the optimizer over the aliases first to learn its class, and again over the DTensors if
    that class is not elementwise, so ``optimizer_fn`` may be called twice.
    """

    def __init__(
        self, optimizer_fn: OptimizerFn, params: list[nn.Parameter], *, local: bool | None = None
    ):
        self.params = params
        self._aliases: dict[int, nn.Parameter] = {}
        """id(parameter) → the plain alias the optimizer steps (alias path only)."""
        if local is not False:
            aliases = {
                id(p): nn.Parameter(p.to_local().detach(), requires_grad=p.requires_grad)
                for p in params
            }
            optimizer = optimizer_fn([aliases[id(p)] for p in params])
            one_device = all(p.device_mesh.size() == 1 for p in params)
            exact = one_device or type(optimizer) in ELEMENTWISE_OPTIMIZERS
            if local and not exact:
                raise ValueError(
                    f"a {type(optimizer).__name__} is not known to update each element on its "
                    "own, so stepping the local shards of a mesh of several devices may differ "
                    "from stepping whole tensors; leave local=None"
                )
            if exact:
                self._aliases, self.optimizer = aliases, optimizer
        if not self._aliases:
            self.optimizer = optimizer_fn(params)

    @property
    def local(self) -> bool:
        """Whether the optimizer steps plain aliases of the local tensors."""
        return bool(self._aliases)

    @property
    def class_name(self) -> str:
        return type(self.optimizer).__name__

    def zero_grad(self) -> None:
        """Drop every gradient (the parameters' and the aliases')."""
        for param in self.params:
            param.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimizer step on the parameters' current gradients."""
        if self.local:
            for param in self.params:
                grad = param.grad
                self._aliases[id(param)].grad = (
                    grad.to_local() if isinstance(grad, DTensor) else grad
                )
        self.optimizer.step()

    def state_of(self, param: nn.Parameter) -> dict[str, Any]:
        """The optimizer state of ``param`` (empty before its first step), tensors of its local
        shape as DTensors in its placement."""
        state = self.optimizer.state.get(self._stepped(param), {})
        if not self.local:
            return dict(state)
        return {name: _as_dtensor_like(value, param) for name, value in state.items()}

    def load_state(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        """Replace ``param``'s optimizer state by ``state`` (in ``state_of``'s form)."""
        if self.local:
            state = {
                name: value.to_local() if isinstance(value, DTensor) else value
                for name, value in state.items()
            }
        self.optimizer.state[self._stepped(param)] = dict(state)

    def _stepped(self, param: nn.Parameter) -> nn.Parameter:
        """What the optimizer steps for ``param``: itself, or its plain alias."""
        return self._aliases[id(param)] if self.local else param


def _as_dtensor_like(value: Any, param: nn.Parameter) -> Any:
    """A plain state tensor of the shape of ``param``'s local tensor as a DTensor view in
    ``param``'s placement; anything else (Adam's scalar ``step``, ``None``) as it is."""
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    if tuple(value.shape) != tuple(param.to_local().shape):
        return value
    return shard_as_dtensor(value, param)
