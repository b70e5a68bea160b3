"""``solve_sharding``: the intra-op pass's entry point."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hierarchical_ap.cluster import Cluster, LogicalMesh
from hierarchical_ap.cost_model import CostModel
from hierarchical_ap.errors import NoFeasiblePlanError
from hierarchical_ap.graph import OpGraph
from intra_op.cost_graph import FP32_ADAM, CostGraph, TrainingMemory, build_cost_graph
from intra_op.ilp import IlpResult, IlpSession, InfeasibleError, minimum_memory
from intra_op.solution import ShardingSolution

logger = logging.getLogger(__name__)


def solve_sharding(
    graph: OpGraph,
    mesh: LogicalMesh,
    cluster: Cluster,
    *,
    memory_budget_bytes: float | None = None,
    nodes: Iterable[str] | None = None,
    cost_model: CostModel | None = None,
    training_memory: TrainingMemory = FP32_ADAM,
    time_limit_s: float = 60.0,
    solver: str = "highs",
    num_microbatches: int = 1,
    lean: bool = False,
) -> ShardingSolution:
    """The cheapest placement of every parameter, input and node of ``graph`` on ``mesh``.

    Minimises forward + backward compute, communication and resharding time of one micro-batch
    of the (sub)graph (``nodes``: solve only these, values from outside are inputs), with
    gradients synchronised once per ``num_microbatches``, subject to ``memory_budget_bytes``
    per device for parameters, gradients, optimizer states and saved activations. ``lean``
    instead asks for the fastest of the assignments of least memory (exact, no budget row:
    ``IlpSession.solve_smallest``), which the outer planner keeps for stages short of memory.
    Raises ``NoFeasiblePlanError`` when nothing fits.
    """
    cost_graph = build_cost_graph(
        graph,
        mesh,
        cost_model or CostModel.for_cluster(cluster),
        nodes=nodes,
        training_memory=training_memory,
        num_microbatches=num_microbatches,
    )
    return solve_cost_graph(
        cost_graph,
        graph,
        mesh,
        cluster,
        memory_budget_bytes=memory_budget_bytes,
        lean=lean,
        time_limit_s=time_limit_s,
        solver=solver,
    )


def solve_cost_graph(
    cost_graph: CostGraph,
    graph: OpGraph,
    mesh: LogicalMesh,
    cluster: Cluster,
    *,
    memory_budget_bytes: float | None = None,
    lean: bool = False,
    time_limit_s: float = 60.0,
    solver: str = "highs",
    session: IlpSession | None = None,
) -> ShardingSolution:
    """``solve_sharding`` on a cost graph built already (``build_cost_graph``): the budget only
    enters constraint (5), so one cost graph serves every memory budget of a part, and so does
    one ``session`` (``IlpSession(cost_graph.problem)``), which re-solves from the last basis."""
    if session is None:
        session = IlpSession(cost_graph.problem, time_limit_s=time_limit_s, solver=solver)
    budget = memory_budget_bytes
    if lean and budget is not None and budget < minimum_memory(cost_graph.problem):
        lean = False  # nothing fits: let the budgeted solve say so
    try:
        result = session.solve_smallest() if lean else session.solve(budget)
    except InfeasibleError as exc:
        raise NoFeasiblePlanError(
            f"{exc} on a {mesh.shape[0]}x{mesh.shape[1]} mesh of {cluster.device.name}; "
            "use more devices, a larger memory budget, or a smaller batch"
        ) from exc
    result, dispatch = _with_dispatch(cost_graph, session, result, budget, lean)

    breakdown = cost_graph.breakdown(result.choice)
    solution = ShardingSolution(
        mesh_shape=tuple(mesh.shape),
        param_placements={},
        input_placements={},
        node_inputs={},
        node_outputs={},
        cost_s=result.objective + sum(dispatch),
        memory_bytes_per_device=cost_graph.problem.memory_of(result.choice),
        num_variables=result.num_variables,
        num_constraints=result.num_constraints,
        solve_time_s=result.solve_time_s,
        solver=result.solver,
        forward_time_s=breakdown.forward_time_s + dispatch[0],
        dispatch_s=sum(dispatch),
        gradient_sync_s=breakdown.gradient_sync_s,
        state_bytes_per_device=breakdown.state_bytes,
        activation_bytes_per_device=breakdown.activation_bytes,
    )
    for name, chooser in cost_graph.choosers.items():
        index = result.choice[chooser.group]
        if chooser.kind == "param":
            solution.param_placements[graph.value_to_param[name]] = chooser.outputs[index]
        elif chooser.kind == "input":
            solution.input_placements[name] = chooser.outputs[index]
        else:
            strategy = chooser.strategies[index]
            solution.node_inputs[name] = strategy.inputs
            solution.node_outputs[name] = strategy.output
            solution.node_strategy_names[name] = strategy.name
    logger.info(
        "sharding of %d nodes on %s: %.3g s, %.3g GiB/device, %d variables, %d constraints, "
        "solved in %.2f s by %s",
        len(solution.node_outputs),
        mesh.shape,
        solution.cost_s,
        solution.memory_bytes_per_device / 2**30,
        solution.num_variables,
        solution.num_constraints,
        solution.solve_time_s,
        solution.solver,
    )
    return solution


def _with_dispatch(
    cost_graph: CostGraph,
    session: IlpSession,
    result: IlpResult,
    budget: float | None,
    lean: bool,
) -> tuple[IlpResult, tuple[float, float]]:
    """The optimum of the objective with DTensor's dispatch charge, and the charge it pays.

    The charge ``D = CostGraph.dispatch_s`` is paid by every assignment that stores some
    parameter other than replicated (the runtime then runs the stage on DTensors), so the
    optimum of ``f(x) + D·[x shards a parameter]`` is the cheaper of the ILP's own optimum
    plus ``D`` (nothing if it replicates every parameter already) and the optimum over the
    replicated assignments (``IlpSession.solve_within``), which pay none. A least-memory
    (``lean``) answer keeps its assignment and pays ``D`` if it shards."""
    dispatch = cost_graph.dispatch_s
    replicated = cost_graph.replicated_params
    if sum(dispatch) == 0 or all(result.choice[g] in ok for g, ok in replicated.items()):
        return result, (0.0, 0.0)
    if not lean:
        try:
            alternative = session.solve_within(budget, replicated)
        except InfeasibleError:
            alternative = None
        if alternative is not None and alternative.objective <= result.objective + sum(dispatch):
            return alternative, (0.0, 0.0)
    return result, dispatch
