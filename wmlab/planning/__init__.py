"""Planners (C) by name, all against one contract (see ``wmlab.planning.base``).

    planner = make_planner("cem", samples=300, topk=30, opt_steps=30)
    result = planner.plan(cost_fn, init)  # cost_fn: actions (B, S, T, A) -> (B, S); init (B, T, A)

``rollout_cost_fn`` (``wmlab.planning.objectives``) turns a world model, the encoded start and goal,
and an ``Objective`` into such a cost_fn. Planner modules are imported when chosen.
"""

from __future__ import annotations

import importlib
import inspect

from wmlab.planning.base import CostFn, Planner, PlanResult

#: name -> "module:class"; config keys are the class's constructor arguments.
PLANNERS: dict[str, str] = {
    "cem": "wmlab.planning.cem:CEM",
    "icem": "wmlab.planning.icem:ICEM",
    "gd": "wmlab.planning.gd:GD",
    "mppi": "wmlab.planning.mppi:MPPI",
}

__all__ = ["PLANNERS", "CostFn", "PlanResult", "Planner", "make_planner", "planner_class"]


def planner_class(name: str) -> type[Planner]:
    """The planner class registered as ``name``; unknown names fail with the known ones."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; known planners: {', '.join(sorted(PLANNERS))}")
    module_name, class_name = PLANNERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_planner(name: str, **cfg) -> Planner:
    """Build planner ``name`` from its config (``conf/planner/<name>.yaml`` keys, minus ``name``).

    Unknown config keys fail with the planner's valid keys (a typo must not silently fall back to a
    default).
    """
    cls = planner_class(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(cfg) - set(params) - {"self"})
    if unknown:
        valid = ", ".join(p for p in params if p != "self")
        raise TypeError(f"planner {name!r} got unknown config keys {unknown}; valid keys: {valid}")
    return cls(**cfg)
