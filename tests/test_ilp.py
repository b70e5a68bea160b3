"""The sharding ILP against brute-force enumeration of every assignment."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from intra_op.ilp import (
    IlpSession,
    InfeasibleError,
    ShardingProblem,
    build_model,
    minimum_memory,
    solve,
)


def random_problem(
    rng: np.random.Generator, groups: int, budget_fraction: float | None
) -> ShardingProblem:
    sizes = rng.integers(1, 5, size=groups)
    costs = [rng.uniform(0, 10, size=k) for k in sizes]
    memory = [rng.uniform(1, 5, size=k) for k in sizes]
    edges = []
    for w in range(1, groups):
        for u in rng.choice(w, size=min(w, int(rng.integers(1, 3))), replace=False):
            edges.append((int(u), w, rng.uniform(0, 10, size=(sizes[u], sizes[w]))))
    budget = None
    if budget_fraction is not None:
        lo = sum(m.min() for m in memory)
        hi = sum(m.max() for m in memory)
        budget = lo + budget_fraction * (hi - lo)
    return ShardingProblem(costs, memory, edges, budget)


def brute_force(problem: ShardingProblem) -> float:
    best = np.inf
    for choice in itertools.product(*(range(len(c)) for c in problem.costs)):
        if problem.memory_budget is not None and problem.memory_of(choice) > problem.memory_budget:
            continue
        best = min(best, problem.objective(choice))
    return best


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("budget_fraction", [None, 0.3])
def test_ilp_optimum_equals_brute_force(seed, budget_fraction):
    problem = random_problem(np.random.default_rng(seed), groups=6, budget_fraction=budget_fraction)
    result = solve(problem)
    assert result.objective == pytest.approx(brute_force(problem), rel=1e-7, abs=1e-9)
    if problem.memory_budget is not None:
        assert problem.memory_of(result.choice) <= problem.memory_budget + 1e-9


def test_cbc_fallback_agrees_with_highs():
    problem = random_problem(np.random.default_rng(99), groups=7, budget_fraction=0.5)
    assert solve(problem, solver="cbc").objective == pytest.approx(solve(problem).objective)


def test_separable_and_constant_edges_need_no_edge_variables():
    costs = [np.array([1.0, 2.0]), np.array([0.0, 0.5, 1.0]), np.array([3.0])]
    separable = np.add.outer(np.array([0.0, 4.0]), np.array([1.0, 0.0, 2.0]))
    edges = [(0, 1, separable), (1, 2, np.array([[1.0], [0.0], [5.0]]))]
    problem = ShardingProblem(costs, [np.zeros(2), np.zeros(3), np.zeros(1)], edges)
    result = solve(problem)
    assert result.num_variables == 5  # only the one-hot s variables of the two free groups
    assert result.objective == pytest.approx(brute_force(problem))


def test_parallel_edges_are_summed():
    costs = [np.zeros(2), np.zeros(2)]
    a = np.array([[0.0, 5.0], [5.0, 9.0]])
    b = np.array([[9.0, 5.0], [5.0, 0.0]])
    problem = ShardingProblem(costs, [np.zeros(2)] * 2, [(0, 1, a), (1, 0, b.T)])
    assert solve(problem).objective == pytest.approx(brute_force(problem)) == pytest.approx(9.0)


def test_infeasible_budget_names_the_smallest_memory():
    problem = random_problem(np.random.default_rng(3), groups=4, budget_fraction=None)
    tight = ShardingProblem(
        problem.costs, problem.memory, problem.edges, minimum_memory(problem) * 0.9
    )
    with pytest.raises(InfeasibleError, match="smallest any strategy needs is"):
        solve(tight)


def test_fractional_lp_relaxation_falls_through_to_branch_and_bound():
    """A knapsack-like budget makes the LP relaxation split a group between two strategies;
    the answer must still be the integer optimum, not a rounded LP point."""
    costs = [np.array([0.0, 3.0]), np.array([0.0, 2.0])]
    memory = [np.array([6.0, 1.0]), np.array([6.0, 1.0])]
    problem = ShardingProblem(costs, memory, [], memory_budget=8.0)
    lp = _lp_relaxation(problem)
    assert not np.allclose(lp, np.round(lp))  # the relaxation is fractional here
    result = solve(problem)
    assert result.objective == pytest.approx(brute_force(problem)) == pytest.approx(2.0)
    assert result.choice == (0, 1)


def test_integral_lp_relaxation_is_the_ilp_optimum():
    """Without a budget these problems' relaxations are integral (the local polytope of a
    tree); the LP answer is then returned as the ILP's and equals brute force."""
    problem = random_problem(np.random.default_rng(5), groups=8, budget_fraction=None)
    lp = _lp_relaxation(problem)
    model = build_model(problem)
    assert np.allclose(lp[model.integer], np.round(lp[model.integer]))
    assert solve(problem).objective == pytest.approx(brute_force(problem), rel=1e-7)


def _lp_relaxation(problem: ShardingProblem) -> np.ndarray:
    """The relaxation's optimum, solved independently of ``solve`` (CBC with no integers)."""
    import pulp

    model = build_model(problem)
    lp = pulp.LpProblem("relaxation", pulp.LpMinimize)
    x = [lp.add_variable(f"x{i}", 0, 1) for i in range(model.num_columns)]
    for r in range(model.num_rows):
        lo, hi = model.row_starts[r], model.row_starts[r + 1]
        expr = pulp.lpDot([x[c] for c in model.columns[lo:hi]], model.values[lo:hi].tolist())
        upper = model.row_upper[r]
        if r == model.num_rows - 1:  # the budget row (5)
            if problem.memory_budget is None:
                continue
            upper = problem.memory_budget - model.fixed_memory
        lp += (expr == upper) if model.row_lower[r] == upper else (expr <= upper)
    lp += pulp.lpDot(x, model.cost.tolist())
    with warnings.catch_warnings():  # PuLP 3.3 flags its bundled CBC for removal in PuLP 4
        warnings.simplefilter("ignore", DeprecationWarning)
        lp.solve(pulp.PULP_CBC_CMD(msg=False))
    return np.array([v.value() for v in x])


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_session_resolves_under_changing_budgets_like_fresh_solves(solver):
    """One session, budgets tightened, loosened and made infeasible in turn: every answer
    equals brute force on the problem with that budget (the kept basis changes nothing)."""
    problem = random_problem(np.random.default_rng(11), groups=7, budget_fraction=None)
    session = IlpSession(problem, solver=solver)
    lo = minimum_memory(problem)
    hi = sum(m.max() for m in problem.memory)
    for budget in (None, lo + 0.2 * (hi - lo), lo + 0.6 * (hi - lo), lo * 0.9, lo * 1.001, None):
        with_budget = ShardingProblem(problem.costs, problem.memory, problem.edges, budget)
        if budget is not None and budget < lo:
            with pytest.raises(InfeasibleError):
                session.solve(budget)
            continue
        result = session.solve(budget)
        assert result.objective == pytest.approx(brute_force(with_budget), rel=1e-7, abs=1e-9)
        if budget is not None:
            assert problem.memory_of(result.choice) <= budget + 1e-9


def test_highs_banner_stays_off_stdout():
    """HiGHS prints a banner on C stdout when a process first builds a solver; a solve must
    leave stdout clean (``hap plan --json`` / ``hap simulate --json`` print JSON there)."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from intra_op.ilp import ShardingProblem, solve\n"
        "edge = np.array([[0.0, 1.0], [1.0, 0.0]])\n"  # not separable: HiGHS must run
        "costs = [np.array([0.0, 0.5]), np.array([0.2, 0.0])]\n"
        "problem = ShardingProblem(costs, [np.ones(2), np.ones(2)], [(0, 1, edge)])\n"
        "print(list(solve(problem).choice))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "[0, 0]\n"


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("seed", range(6))
def test_smallest_is_the_fastest_of_the_least_memory_assignments(solver, seed):
    """Brute force: the least total memory over all assignments, then the least objective
    among the assignments that reach it; memory values are drawn from a few levels so that
    several groups have ties the solver must break by time."""
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, groups=6, budget_fraction=None)
    tied = [rng.integers(1, 3, size=len(m)).astype(float) for m in problem.memory]
    problem = ShardingProblem(problem.costs, tied, problem.edges)
    choices = list(itertools.product(*(range(len(c)) for c in problem.costs)))
    least = min(problem.memory_of(c) for c in choices)
    expected = min(problem.objective(c) for c in choices if problem.memory_of(c) == least)
    session = IlpSession(problem, solver=solver)
    session.solve(None)  # a warm basis from the unconstrained optimum changes nothing
    result = session.solve_smallest()
    assert problem.memory_of(result.choice) == pytest.approx(least)
    assert result.objective == pytest.approx(expected, rel=1e-7)
    # the exclusion is undone: the session's next unconstrained solve is the free optimum
    assert session.solve(None).objective == pytest.approx(brute_force(problem), rel=1e-7)


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("seed", range(6))
def test_solve_within_is_the_brute_force_optimum_over_the_allowed_strategies(solver, seed):
    rng = np.random.default_rng(100 + seed)
    problem = random_problem(rng, groups=6, budget_fraction=0.6)
    allowed = {
        g: tuple(sorted(rng.choice(len(c), size=int(rng.integers(1, len(c) + 1)), replace=False)))
        for g, c in enumerate(problem.costs)
        if g % 2 == 0 and len(c) > 1
    }
    choices = [
        c
        for c in itertools.product(*(range(len(c)) for c in problem.costs))
        if all(c[g] in ok for g, ok in allowed.items())
        and problem.memory_of(c) <= problem.memory_budget
    ]
    session = IlpSession(problem, solver=solver)
    if not choices:
        with pytest.raises(InfeasibleError):
            session.solve_within(problem.memory_budget, allowed)
        return
    result = session.solve_within(problem.memory_budget, allowed)
    assert all(result.choice[g] in ok for g, ok in allowed.items())
    assert result.objective == pytest.approx(min(problem.objective(c) for c in choices), rel=1e-7)
    # the restriction is undone for the session's next solve
    free = ShardingProblem(problem.costs, problem.memory, problem.edges, problem.memory_budget)
    assert session.solve(problem.memory_budget).objective == pytest.approx(
        brute_force(free), rel=1e-7
    )


def test_solve_within_refuses_a_constant_group_outside_its_allowed_strategies():
    problem = ShardingProblem([np.array([1.0]), np.array([2.0, 3.0])], [np.ones(1), np.ones(2)], [])
    session = IlpSession(problem)
    with pytest.raises(InfeasibleError, match="group 0's only strategy"):
        session.solve_within(None, {0: ()})
    with pytest.raises(InfeasibleError, match="group 1 has no allowed strategy"):
        session.solve_within(None, {1: (5,)})
    assert session.solve_within(None, {1: (1,)}).choice == (0, 1)
