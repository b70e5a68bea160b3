"""The user's optimizer over one worker's parameter shards.

``ShardOptimizer`` builds the optimizer with the user's ``optimizer_fn`` and steps it after the
gradient synchronisation. On a mesh of several devices it steps the DTensor parameters
themselves (every shard's update is local; DTensor runs each elementwise op on the local
tensors). On a one-device mesh a DTensor's local tensor is its whole value, so the optimizer is
built over plain ``nn.Parameter`` aliases of the local tensors instead (same storage, so an
update in place is an update of the DTensor parameter): the step then runs torch's plain-tensor
kernels, without DTensor's dispatch for each of the dozen ops per parameter, which dominated
the step of a one-device stage. Before each step every alias receives its parameter's
accumulated gradient (the DTensor gradient's local tensor, no copy).

The optimizer state is the same either way as far as checkpoints see it: ``state_of`` gives a
parameter's state with every tensor of the parameter's shape as a DTensor in the parameter's
placement (on the plain path, a DTensor view of the plain moment), and ``load_state`` takes
state in that form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from intra_op.apply import shard_as_dtensor

OptimizerFn = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class ShardOptimizer:
    """``optimizer_fn`` over ``params`` (DTensor parameters on one mesh), stepping plain
    aliases of them when ``plain`` (a one-device mesh)."""

    def __init__(self, optimizer_fn: OptimizerFn, params: list[nn.Parameter], *, plain: bool):
        if plain and any(p.device_mesh.size() != 1 for p in params):
            raise ValueError("plain aliases hold whole values only on a one-device mesh")
        self.params = params
        self.plain = plain
        self._aliases: dict[int, nn.Parameter] = (
            {
                id(p): nn.Parameter(p.to_local().detach(), requires_grad=p.requires_grad)
                for p in params
            }
            if plain
            else {}
        )
        """id(parameter) → the plain alias the optimizer steps (plain path only)."""
        self.optimizer = optimizer_fn([self._stepped(p) for p in params])

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
        if self.plain:
            for param in self.params:
                grad = param.grad
                self._aliases[id(param)].grad = (
                    grad.to_local() if isinstance(grad, DTensor) else grad
                )
        self.optimizer.step()

    def state_of(self, param: nn.Parameter) -> dict[str, Any]:
        """The optimizer state of ``param`` (empty before its first step), tensors of its shape
        as DTensors in its placement."""
        state = self.optimizer.state.get(self._stepped(param), {})
        if not self.plain:
            return dict(state)
        return {name: _as_dtensor_like(value, param) for name, value in state.items()}

    def load_state(self, param: nn.Parameter, state: Mapping[str, Any]) -> None:
        """Replace ``param``'s optimizer state by ``state`` (in ``state_of``'s form)."""
        if self.plain:
            state = {
                name: value.to_local() if isinstance(value, DTensor) else value
                for name, value in state.items()
            }
        self.optimizer.state[self._stepped(param)] = dict(state)

    def _stepped(self, param: nn.Parameter) -> nn.Parameter:
        """What the optimizer steps for ``param``: itself, or its plain alias."""
        return self._aliases[id(param)] if self.plain else param


def _as_dtensor_like(value: Any, param: nn.Parameter) -> Any:
    """A plain state tensor of ``param``'s shape as a DTensor view in ``param``'s placement;
    anything else (Adam's scalar ``step``, ``None``) as it is."""
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor):
        return value
    if tuple(value.shape) != tuple(param.shape):
        return value
    return shard_as_dtensor(value, param)
