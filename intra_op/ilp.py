"""The sharding ILP (Alpa, OSDI'22, §4), over plain arrays.

Decision groups ``v = 1..V`` (a node together with the nodes that follow it) each choose one of
``k_v`` strategies. Group ``v`` has a cost vector ``c_v`` (compute + intrinsic communication +
resharding between members of the group, seconds) and a memory vector ``m_v`` (bytes per
device). An edge ``(u, w)`` between two groups has a resharding matrix ``R_uw`` of shape
``k_u × k_w``: the forward and backward redistribution time when ``u`` picks ``i`` and ``w``
picks ``j``.

Variables: ``s_v ∈ {0,1}^{k_v}`` (one-hot choice) and ``e_uw ∈ [0,1]^{k_u·k_w}`` (the
linearisation of the product ``s_u s_wᵀ``).

    minimise    Σ_v c_vᵀ s_v + Σ_(u,w) ⟨R_uw, e_uw⟩

    subject to  (1)  Σ_i s_{v,i} = 1                         for every group v
                (2)  Σ_{i,j} e_{uw,ij} = 1                    for every edge (u, w)
                (3)  Σ_j e_{uw,ij} ≤ s_{u,i}                  for every edge and row i
                (4)  Σ_i e_{uw,ij} ≤ s_{w,j}                  for every edge and column j
                (5)  Σ_v m_vᵀ s_v ≤ M                         when a memory budget M is given

With binary ``s``, (2)–(4) force ``e_uw`` to the one-hot outer product of ``s_u`` and ``s_w``
(every row but ``i*`` and every column but ``j*`` sum to 0), so ``e`` is continuous, which
keeps the branch-and-bound small.

Before solving, the problem shrinks:
* a group with a single strategy becomes a constant; its edges turn into linear terms of the
  other endpoint;
* parallel edges between the same two groups are summed;
* an edge whose matrix is separable, ``R_ij = a_i + b_j``, is folded into ``c_u`` and ``c_w``
  (no ``e`` variables are needed for it).

Solved with PuLP: HiGHS (highspy) by default, CBC as fallback, under a time limit.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pulp

logger = logging.getLogger(__name__)

SEPARABLE_TOLERANCE = 1e-12
MIP_RELATIVE_GAP = 1e-9
OBJECTIVE_SCALE = 1e6
"""The solver's objective is in microseconds (costs are given in seconds)."""
MIP_ABSOLUTE_GAP = 1e-6
"""Optimality gaps (relative; absolute in microseconds) at which the solver stops: tight, so
that the nanosecond tie-breaks of ``intra_op.cost_graph`` count."""


class InfeasibleError(Exception):
    """No choice satisfies the memory budget (constraint 5)."""


@dataclass(frozen=True)
class ShardingProblem:
    """Costs and memory of every decision group, and resharding matrices between groups."""

    costs: Sequence[np.ndarray]
    memory: Sequence[np.ndarray]
    edges: Sequence[tuple[int, int, np.ndarray]]
    memory_budget: float | None = None

    def objective(self, choice: Sequence[int]) -> float:
        """Objective value of a full assignment (for checks and brute force)."""
        total = sum(float(c[i]) for c, i in zip(self.costs, choice, strict=True))
        return total + sum(float(r[choice[u], choice[w]]) for u, w, r in self.edges)

    def memory_of(self, choice: Sequence[int]) -> float:
        return sum(float(m[i]) for m, i in zip(self.memory, choice, strict=True))


@dataclass(frozen=True)
class IlpResult:
    choice: tuple[int, ...]
    objective: float
    num_variables: int
    num_constraints: int
    solve_time_s: float
    solver: str


def solve(
    problem: ShardingProblem, *, time_limit_s: float = 60.0, solver: str = "highs"
) -> IlpResult:
    """Solve the ILP; raises ``InfeasibleError`` when nothing fits ``memory_budget``."""
    started = time.perf_counter()
    # The solver sees microseconds: well-scaled coefficients, and nanosecond tie-breaks stay
    # above its tolerances.
    costs = [np.asarray(c, dtype=float) * OBJECTIVE_SCALE for c in problem.costs]
    memory = [np.asarray(m, dtype=float) for m in problem.memory]
    edges = _reduce_edges(
        [(u, w, np.asarray(r, dtype=float) * OBJECTIVE_SCALE) for u, w, r in problem.edges], costs
    )

    free = [v for v, c in enumerate(costs) if len(c) > 1]
    model = pulp.LpProblem("sharding", pulp.LpMinimize)
    s = {
        v: [model.add_variable(f"s_{v}_{i}", 0, 1, cat=pulp.LpBinary) for i in range(len(costs[v]))]
        for v in free
    }
    objective = [pulp.lpDot(s[v], costs[v].tolist()) for v in free]
    num_constraints = 0
    for v in free:
        model += pulp.lpSum(s[v]) == 1  # (1)
        num_constraints += 1
    num_edge_vars = 0
    for index, (u, w, r) in enumerate(edges):
        e = [
            [model.add_variable(f"e_{index}_{i}_{j}", 0, 1) for j in range(r.shape[1])]
            for i in range(r.shape[0])
        ]
        num_edge_vars += r.size
        objective.append(pulp.lpDot([x for row in e for x in row], r.ravel().tolist()))
        model += pulp.lpSum(x for row in e for x in row) == 1  # (2)
        for i in range(r.shape[0]):
            model += pulp.lpSum(e[i]) <= s[u][i]  # (3)
        for j in range(r.shape[1]):
            model += pulp.lpSum(e[i][j] for i in range(r.shape[0])) <= s[w][j]  # (4)
        num_constraints += 1 + r.shape[0] + r.shape[1]
    fixed_memory = sum(float(memory[v][0]) for v in range(len(costs)) if v not in s)
    if problem.memory_budget is not None:
        model += (
            pulp.lpSum(pulp.lpDot(s[v], memory[v].tolist()) for v in free)
            <= problem.memory_budget - fixed_memory
        )  # (5)
        num_constraints += 1
    model += pulp.lpSum(objective) + sum(
        float(costs[v][0]) for v in range(len(costs)) if v not in s
    )

    used = _run_solver(model, time_limit_s, solver)
    if model.status == pulp.LpStatusInfeasible:
        raise InfeasibleError(_smallest_memory_message(problem))
    values = {v: [x.value() or 0.0 for x in s[v]] for v in free}
    if any(max(vals) < 0.5 for vals in values.values()):
        raise RuntimeError(
            f"{used} stopped with status {pulp.LpStatus[model.status]!r} and no assignment; "
            "raise the time limit"
        )
    choice = tuple(int(np.argmax(values[v])) if v in values else 0 for v in range(len(costs)))
    return IlpResult(
        choice=choice,
        objective=problem.objective(choice),
        num_variables=sum(len(x) for x in s.values()) + num_edge_vars,
        num_constraints=num_constraints,
        solve_time_s=time.perf_counter() - started,
        solver=used,
    )


def minimum_memory(problem: ShardingProblem) -> float:
    """Smallest memory any assignment needs: each group's cheapest option (memory is additive)."""
    return float(sum(np.min(m) for m in problem.memory))


def _smallest_memory_message(problem: ShardingProblem) -> str:
    return (
        f"no sharding fits the memory budget of {problem.memory_budget / 2**30:.2f} GiB per device; "
        f"the smallest any strategy needs is {minimum_memory(problem) / 2**30:.2f} GiB"
    )


def _run_solver(model: pulp.LpProblem, time_limit_s: float, solver: str) -> str:
    if solver == "highs":
        try:
            model.solve(
                pulp.HiGHS(
                    msg=False,
                    timeLimit=time_limit_s,
                    threads=1,
                    gapRel=MIP_RELATIVE_GAP,
                    gapAbs=MIP_ABSOLUTE_GAP,
                )
            )
            return "highs"
        except pulp.PulpSolverError as exc:
            logger.warning("HiGHS failed (%s); falling back to CBC", exc)
    with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC for removal in PuLP 4
        warnings.simplefilter("ignore", DeprecationWarning)
        cbc = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit_s, gapRel=MIP_RELATIVE_GAP, gapAbs=MIP_ABSOLUTE_GAP
        )
    model.solve(cbc)
    return "cbc"


def _reduce_edges(
    edges: Sequence[tuple[int, int, np.ndarray]], costs: list[np.ndarray]
) -> list[tuple[int, int, np.ndarray]]:
    """Fold constant endpoints and separable matrices into ``costs``; merge parallel edges."""
    merged: dict[tuple[int, int], np.ndarray] = {}
    for u, w, r in edges:
        r = np.asarray(r, dtype=float)
        if r.shape != (len(costs[u]), len(costs[w])):
            raise ValueError(
                f"edge ({u}, {w}) has a {r.shape} matrix for {len(costs[u])}×{len(costs[w])} strategies"
            )
        if u == w:
            raise ValueError(
                f"edge ({u}, {w}) joins a group to itself; add its diagonal to the costs"
            )
        if u > w:
            u, w, r = w, u, r.T
        merged[(u, w)] = merged[(u, w)] + r if (u, w) in merged else r
    reduced = []
    for (u, w), r in merged.items():
        if len(costs[u]) == 1:
            costs[w] += r[0]
        elif len(costs[w]) == 1:
            costs[u] += r[:, 0]
        elif _is_separable(r):
            costs[u] += r[:, 0]
            costs[w] += r[0] - r[0, 0]
        else:
            reduced.append((u, w, r))
    return reduced


def _is_separable(r: np.ndarray) -> bool:
    """True when ``r[i, j] = a_i + b_j`` for some vectors a, b."""
    residual = r - r[:, :1] - r[:1, :] + r[0, 0]
    scale = max(float(np.abs(r).max()), 1.0)
    return bool(np.abs(residual).max() <= SEPARABLE_TOLERANCE * scale)
