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

The *smallest* assignment (``IlpSession.solve_smallest``) is exact without a budget row: memory
is additive over groups, so ``Σ_v m_vᵀ s_v`` is minimal exactly when every group picks one of its
least-memory strategies. Fixing every other ``s_{v,i}`` to 0 and minimising time leaves an
unbudgeted problem (an LP, as a rule): the fastest of the smallest assignments.

The shrunk problem is laid out as sparse arrays (``build_model``) and solved by HiGHS through
highspy by default, or by CBC through PuLP (the fallback, from the same arrays), under a time
limit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


MEMORY_TIE_TOLERANCE = 1e-9
"""Strategies whose memory exceeds their group's least by at most this fraction of the least
total memory count as least-memory strategies (``IlpSession.solve_smallest``)."""

INTEGRALITY_TOLERANCE = 1e-9
"""How close to 0 or 1 every ``s`` of an LP-relaxation optimum must be to be taken as is."""


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
    return IlpSession(problem, time_limit_s=time_limit_s, solver=solver).solve(
        problem.memory_budget
    )


class IlpSession:
    """One problem solved under several memory budgets (the right-hand side of (5)).

    The model is laid out once; with HiGHS the solver object is kept, so a solve after a budget
    change starts from the previous basis (a few dual simplex steps instead of a new solve).
    ``problem.memory_budget`` is ignored: each ``solve`` names its own budget.
    """

    def __init__(
        self, problem: ShardingProblem, *, time_limit_s: float = 60.0, solver: str = "highs"
    ) -> None:
        self.problem = problem
        self.model = build_model(problem)
        self.time_limit_s = time_limit_s
        self.solver = solver
        self._highs: _HighsModel | None = None

    def solve(self, memory_budget: float | None) -> IlpResult:
        """The optimum under ``memory_budget`` bytes per device (``None``: unbounded)."""
        return self._solve(memory_budget, np.zeros(0, dtype=np.int32))

    def solve_within(
        self, memory_budget: float | None, allowed: Mapping[int, Sequence[int]]
    ) -> IlpResult:
        """The optimum under ``memory_budget`` with each group ``v`` of ``allowed`` choosing
        only among the strategies ``allowed[v]`` (the others' ``s`` fixed to 0). Raises
        ``InfeasibleError`` when a group has no allowed strategy (a constant group's only one
        among them) or nothing allowed fits the budget."""
        excluded: list[int] = []
        for group, strategies in allowed.items():
            span = self.model.group_columns[group]
            keep = set(strategies)
            if span is None:
                if 0 not in keep:
                    raise InfeasibleError(f"group {group}'s only strategy is not allowed")
                continue
            if not keep & set(range(span[1] - span[0])):
                raise InfeasibleError(f"group {group} has no allowed strategy")
            excluded += [span[0] + i for i in range(span[1] - span[0]) if i not in keep]
        return self._solve(memory_budget, np.asarray(excluded, dtype=np.int32))

    def solve_smallest(self) -> IlpResult:
        """The fastest of the assignments of least memory (module docstring: exact, no budget
        row; ties in memory within ``MEMORY_TIE_TOLERANCE`` count as equal)."""
        excess = self.model.memory_excess
        tolerance = MEMORY_TIE_TOLERANCE * max(1.0, minimum_memory(self.problem))
        return self._solve(None, np.flatnonzero(excess > tolerance).astype(np.int32))

    def _solve(self, memory_budget: float | None, excluded: np.ndarray) -> IlpResult:
        """The optimum under ``memory_budget`` with the ``excluded`` columns fixed to 0."""
        started = time.perf_counter()
        upper = np.inf if memory_budget is None else memory_budget - self.model.fixed_memory
        status, values, used = None, None, self.solver
        if self.solver == "highs":
            try:
                if self._highs is None:
                    self._highs = _HighsModel(self.model, self.time_limit_s)
                status, values = self._highs.solve(upper, excluded)
            except _SolverFailed as exc:
                logger.warning("HiGHS failed (%s); falling back to CBC", exc)
                used = "cbc"
        if used != "highs":
            status, values = _solve_cbc(self.model, upper, self.time_limit_s, excluded)
            used = "cbc"
        if status == "infeasible":
            raise InfeasibleError(_smallest_memory_message(self.problem, memory_budget))
        if values is None or not _one_hot(self.model, values):
            raise RuntimeError(
                f"{used} stopped with status {status!r} and no assignment; raise the time limit"
            )
        choice = self.model.choice(values)
        return IlpResult(
            choice=choice,
            objective=self.problem.objective(choice),
            num_variables=self.model.num_columns,
            num_constraints=self.model.num_rows,
            solve_time_s=time.perf_counter() - started,
            solver=used,
        )


@dataclass(frozen=True)
class LinearModel:
    """The shrunk ILP in standard form: ``min cᵀx`` s.t. ``row_lower ≤ A x ≤ row_upper``,
    ``0 ≤ x ≤ 1``, ``x`` binary where ``integer``; ``A`` row-wise (CSR arrays).

    Columns are the ``s`` variables of the free groups (binary) followed by the ``e``
    variables of the edges (continuous); rows are constraints (1)–(5) in that order, (5)
    always present and last.
    """

    cost: np.ndarray
    integer: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    row_starts: np.ndarray
    columns: np.ndarray
    values: np.ndarray
    group_columns: tuple[tuple[int, int] | None, ...]
    """Per group: the ``[start, stop)`` of its ``s`` columns, ``None`` for a constant group."""
    fixed_memory: float
    """Memory of the constant groups: the budget row (5), the last, bounds the rest by
    ``budget − fixed_memory`` (its upper bound is infinite until a budget is given)."""
    memory_excess: np.ndarray
    """Per column: the memory of its strategy above its group's least (0 for ``e`` columns)."""

    @property
    def num_columns(self) -> int:
        return len(self.cost)

    @property
    def num_rows(self) -> int:
        return len(self.row_lower)

    def choice(self, x: np.ndarray) -> tuple[int, ...]:
        """Each group's strategy in a solution vector ``x``."""
        return tuple(
            0 if span is None else int(np.argmax(x[span[0] : span[1]]))
            for span in self.group_columns
        )


def build_model(problem: ShardingProblem) -> LinearModel:
    """Shrink the problem (module docstring) and lay out constraints (1)–(5) as arrays; the
    budget row (5) is left unbounded (``IlpSession.solve`` sets it)."""
    # The solver sees microseconds: well-scaled coefficients, and nanosecond tie-breaks stay
    # above its tolerances.
    costs = [np.asarray(c, dtype=float) * OBJECTIVE_SCALE for c in problem.costs]
    memory = [np.asarray(m, dtype=float) for m in problem.memory]
    edges = _reduce_edges(
        [(u, w, np.asarray(r, dtype=float) * OBJECTIVE_SCALE) for u, w, r in problem.edges], costs
    )
    group_columns: list[tuple[int, int] | None] = []
    column = 0
    for c in costs:
        if len(c) > 1:
            group_columns.append((column, column + len(c)))
            column += len(c)
        else:
            group_columns.append(None)
    num_s = column
    edge_start = []
    for _, _, r in edges:
        edge_start.append(column)
        column += r.size
    cost = np.concatenate(
        [c for c in costs if len(c) > 1] + [r.ravel() for _, _, r in edges] + [np.zeros(0)]
    )
    rows = _Rows()
    for span in group_columns:
        if span is not None:
            rows.add(np.arange(*span), np.ones(span[1] - span[0]), 1.0, 1.0)  # (1)
    for (u, w, r), start in zip(edges, edge_start, strict=True):
        k_u, k_w = r.shape
        e = start + np.arange(r.size).reshape(k_u, k_w)
        rows.add(e.ravel(), np.ones(r.size), 1.0, 1.0)  # (2)
        su, sw = group_columns[u], group_columns[w]
        assert su is not None and sw is not None
        for i in range(k_u):
            rows.add(np.append(e[i], su[0] + i), _less_than_column(k_w), -np.inf, 0.0)  # (3)
        for j in range(k_w):
            rows.add(np.append(e[:, j], sw[0] + j), _less_than_column(k_u), -np.inf, 0.0)  # (4)
    fixed = sum(float(m[0]) for m, span in zip(memory, group_columns, strict=True) if span is None)
    free = [(span, m) for m, span in zip(memory, group_columns, strict=True) if span is not None]
    rows.add(
        np.concatenate([np.arange(*span) for span, _ in free] + [np.zeros(0, dtype=int)]),
        np.concatenate([m for _, m in free] + [np.zeros(0)]),
        -np.inf,
        np.inf,
    )  # (5), bounded by IlpSession.solve
    integer = np.zeros(column, dtype=bool)
    integer[:num_s] = True
    excess = np.zeros(column)
    for span, m in free:
        excess[span[0] : span[1]] = m - m.min()
    return LinearModel(
        cost,
        integer,
        *rows.arrays(),
        group_columns=tuple(group_columns),
        fixed_memory=fixed,
        memory_excess=excess,
    )


def _less_than_column(count: int) -> np.ndarray:
    """Coefficients of ``Σ e − s ≤ 0`` over ``count`` edge variables and one ``s``."""
    return np.append(np.ones(count), -1.0)


class _Rows:
    """Accumulates constraint rows into CSR arrays."""

    def __init__(self) -> None:
        self.columns: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, columns: np.ndarray, values: np.ndarray, lower: float, upper: float) -> None:
        self.columns.append(np.asarray(columns, dtype=np.int32))
        self.values.append(np.asarray(values, dtype=float))
        self.lower.append(lower)
        self.upper.append(upper)

    def arrays(self) -> tuple[np.ndarray, ...]:
        starts = np.zeros(len(self.columns) + 1, dtype=np.int32)
        starts[1:] = np.cumsum([len(c) for c in self.columns])
        empty_int, empty = np.zeros(0, dtype=np.int32), np.zeros(0)
        return (
            np.asarray(self.lower, dtype=float),
            np.asarray(self.upper, dtype=float),
            starts,
            np.concatenate(self.columns + [empty_int]),
            np.concatenate(self.values + [empty]),
        )


class _SolverFailed(Exception):
    """The solver could not be run (not: the problem is infeasible)."""


_HIGHS_BANNER_SHOWN = False


def _new_highs(highspy: Any) -> Any:
    """A ``highspy.Highs`` instance. The library prints its banner on C ``stdout`` the first
    time a process builds one, which would corrupt ``hap plan --json`` and ``hap simulate
    --json``; that first construction runs with file descriptor 1 pointed at ``/dev/null``
    (forked ILP workers inherit the shown state)."""
    global _HIGHS_BANNER_SHOWN
    if _HIGHS_BANNER_SHOWN:
        return highspy.Highs()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highs = highspy.Highs()
        libc.fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _HIGHS_BANNER_SHOWN = True
    return highs


class _HighsModel:
    """A ``LinearModel`` loaded into HiGHS (highspy), re-solvable under new budgets.

    The LP relaxation is solved first (a warm basis is kept between budgets). When its optimum has every ``s`` at 0 or 1 it is optimal
    for the ILP as well (its objective bounds the ILP's from below and it is a feasible ILP
    point), and the branch-and-bound, whose set-up costs several times the LP on these
    problems, is skipped. Otherwise the ILP is solved, and the integrality dropped again for
    the next budget."""

    def __init__(self, model: LinearModel, time_limit_s: float) -> None:
        import highspy

        self.model = model
        self.integer = np.flatnonzero(model.integer).astype(np.int32)
        highs = _new_highs(highspy)
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("time_limit", float(time_limit_s))
        highs.setOptionValue("threads", 1)
        highs.setOptionValue("mip_rel_gap", MIP_RELATIVE_GAP)
        highs.setOptionValue("mip_abs_gap", MIP_ABSOLUTE_GAP)
        # Presolve and restarts cost more than they save on these problems: the ILPs that
        # reach branch-and-bound are solved at or near the root, about twice as fast without.
        highs.setOptionValue("presolve", "off")
        highs.setOptionValue("mip_allow_restart", False)
        n = model.num_columns
        highs.addVars(n, np.zeros(n), np.ones(n))
        highs.changeColsCost(n, np.arange(n, dtype=np.int32), model.cost)
        highs.addRows(
            model.num_rows,
            model.row_lower,
            model.row_upper,
            len(model.values),
            model.row_starts[:-1],
            model.columns,
            model.values,
        )
        self.highs = highs

    def solve(self, budget_row_upper: float, excluded: np.ndarray) -> tuple[str, np.ndarray | None]:
        """``(status, x or None)`` with the budget row (5) bounded by ``budget_row_upper`` and
        the ``excluded`` columns fixed to 0."""
        highs, model = self.highs, self.model
        if model.num_columns == 0:
            return ("optimal" if budget_row_upper >= 0 else "infeasible"), np.zeros(0)
        count = len(excluded)
        if count:
            highs.changeColsBounds(count, excluded, np.zeros(count), np.zeros(count))
        try:
            return self._solve(budget_row_upper)
        finally:
            if count:
                highs.changeColsBounds(count, excluded, np.zeros(count), np.ones(count))

    def _solve(self, budget_row_upper: float) -> tuple[str, np.ndarray | None]:
        import highspy

        highs, model = self.highs, self.model
        highs.changeRowBounds(model.num_rows - 1, -highspy.kHighsInf, budget_row_upper)
        status, values = _run_highs(highs, model.num_columns)
        if values is None or _is_integral(values[model.integer]):
            return status, values
        count = len(self.integer)
        highs.changeColsIntegrality(
            count, self.integer, np.full(count, highspy.HighsVarType.kInteger)
        )
        try:
            return _run_highs(highs, model.num_columns)
        finally:
            highs.changeColsIntegrality(
                count, self.integer, np.full(count, highspy.HighsVarType.kContinuous)
            )


def _run_highs(highs: Any, num_columns: int) -> tuple[str, np.ndarray | None]:
    import highspy

    if highs.run() == highspy.HighsStatus.kError:
        raise _SolverFailed(highs.modelStatusToString(highs.getModelStatus()))
    status = highs.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return "infeasible", None
    values = np.asarray(highs.getSolution().col_value)
    return highs.modelStatusToString(status), values if len(values) == num_columns else None


def _is_integral(values: np.ndarray) -> bool:
    return bool(np.all(np.minimum(np.abs(values), np.abs(values - 1.0)) <= INTEGRALITY_TOLERANCE))


def _solve_cbc(
    model: LinearModel, budget_row_upper: float, time_limit_s: float, excluded: np.ndarray
) -> tuple[str, np.ndarray | None]:
    """CBC through PuLP, from the same arrays; ``(status, x or None)``."""
    lp = pulp.LpProblem("sharding", pulp.LpMinimize)
    x = [
        lp.add_variable(
            f"x_{i}", 0, 1, cat=pulp.LpBinary if model.integer[i] else pulp.LpContinuous
        )
        for i in range(model.num_columns)
    ]
    for i in excluded:
        x[i].upBound = 0  # after creation: PuLP resets a binary's bounds to [0, 1]
    for r in range(model.num_rows):
        lo, hi = model.row_starts[r], model.row_starts[r + 1]
        expr = pulp.lpDot([x[c] for c in model.columns[lo:hi]], model.values[lo:hi].tolist())
        lower, upper = model.row_lower[r], model.row_upper[r]
        if r == model.num_rows - 1:
            upper = budget_row_upper
        if lower == upper:
            lp += expr == float(upper)
        elif np.isfinite(upper):
            lp += expr <= float(upper)
    lp += pulp.lpDot(x, model.cost.tolist())
    with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC for removal in PuLP 4
        warnings.simplefilter("ignore", DeprecationWarning)
        cbc = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit_s, gapRel=MIP_RELATIVE_GAP, gapAbs=MIP_ABSOLUTE_GAP
        )
    lp.solve(cbc)
    if lp.status == pulp.LpStatusInfeasible:
        return "infeasible", None
    return pulp.LpStatus[lp.status], np.array([v.value() or 0.0 for v in x])


def _one_hot(model: LinearModel, x: np.ndarray) -> bool:
    return all(span is None or x[span[0] : span[1]].max() > 0.5 for span in model.group_columns)


def minimum_memory(problem: ShardingProblem) -> float:
    """Smallest memory any assignment needs: each group's cheapest option (memory is additive)."""
    return float(sum(np.min(m) for m in problem.memory))


def _smallest_memory_message(problem: ShardingProblem, budget: float | None) -> str:
    return (
        f"no sharding fits the memory budget of {(budget or 0.0) / 2**30:.2f} GiB per device; "
        f"the smallest any strategy needs is {minimum_memory(problem) / 2**30:.2f} GiB"
    )


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
