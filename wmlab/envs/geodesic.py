"""Shortest-path (geodesic) distance between agent positions in a maze, in qpos world units.

Model. The agent's centre moves in the maze's free space with every wall cell inflated by the
agent's collision radius (the ``particle_geom`` sphere, r = 0.1), so a corridor one cell wide is
0.8 wide for the centre. The inflation is a square one (each wall box grows by r on every side),
which turns the free space into a rectilinear polygon: a shortest path in it is a polyline whose
bends sit on convex corners of the inflated walls, so a visibility graph over those corners with
Dijkstra (here all-pairs Floyd-Warshall, once per layout) gives the exact shortest path.

Accuracy. Exact (to float precision) for that square-inflated free space. The true configuration
space of a round agent rounds each convex corner with radius r, which lets a path cut a corner:
the square model overestimates by at most r (2 - pi / 2) ~= 0.043 per 90-degree corner turned
(a U-maze bend turns two), and is exact for paths in sight of each other (same corridor =
Euclidean). Positions slightly inside the inflated walls (a contact can push the centre a little
closer than r) are first moved to the nearest free point, and that move is counted in the length.
A position inside a wall cell itself, or outside the maze, is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from wmlab.envs.maze_layouts import CELL_TO_QPOS_OFFSET, MazeLayout

#: Collision radius of the point mass (``particle_geom`` sphere size in the MJCF).
AGENT_RADIUS = 0.1
#: Boxes shrink by this much in visibility tests, so a path grazing a corner or running along an
#: inflated wall's edge counts as free (it is: the boundary belongs to the free space).
_EPS = 1e-9
#: A position may sit this far inside a raw wall cell (float noise) before it is an error.
_WALL_TOLERANCE = 1e-6


@dataclass(frozen=True)
class _Graph:
    boxes: np.ndarray  # (K, 4) inflated wall boxes [x_lo, x_hi, y_lo, y_hi]
    walls: np.ndarray  # (W, 4) raw wall boxes
    free: np.ndarray  # (C, 4) raw free-cell boxes
    nodes: np.ndarray  # (V, 2) convex corners of the inflated walls inside the maze
    dist: np.ndarray  # (V, V) shortest-path distances between nodes (inf if unreachable)


def _cell_boxes(cells) -> np.ndarray:
    """Cells (w, h) -> boxes (K, 4) in qpos: a cell is the unit square around its centre."""
    centres = np.asarray(cells, dtype=np.float64).reshape(-1, 2) + CELL_TO_QPOS_OFFSET  # (K, 2)
    return np.stack(
        [centres[:, 0] - 0.5, centres[:, 0] + 0.5, centres[:, 1] - 0.5, centres[:, 1] + 0.5], axis=1
    )


def segments_blocked(p: np.ndarray, q: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Whether each segment p->q passes through the open interior of any box.

    p, q: (..., 2) endpoints (broadcast together); boxes: (K, 4) [x_lo, x_hi, y_lo, y_hi].
    Returns bool (...). Liang-Barsky clipping against each box shrunk by a tiny epsilon, so
    touching a box's boundary (a corner, an edge) is not blocking.
    """
    p, q = np.broadcast_arrays(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64))
    shape = p.shape[:-1]
    p = p.reshape(-1, 1, 2)  # (M, 1, 2)
    d = q.reshape(-1, 1, 2) - p  # (M, 1, 2)
    lo = boxes[None, :, [0, 2]] + _EPS  # (1, K, 2)
    hi = boxes[None, :, [1, 3]] - _EPS  # (1, K, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo = (lo - p) / d  # (M, K, 2)
        t_hi = (hi - p) / d
    t_enter = np.where(d == 0, np.where((p > lo) & (p < hi), -np.inf, np.inf), np.minimum(t_lo, t_hi))
    t_exit = np.where(d == 0, np.where((p > lo) & (p < hi), np.inf, -np.inf), np.maximum(t_lo, t_hi))
    t0 = np.maximum(t_enter.max(axis=-1), 0.0)  # (M, K)
    t1 = np.minimum(t_exit.min(axis=-1), 1.0)
    return (t0 < t1).any(axis=-1).reshape(shape)


def _inside(points: np.ndarray, boxes: np.ndarray, margin: float) -> np.ndarray:
    """bool (M, K): point m strictly inside box k shrunk by ``margin``."""
    x, y = points[:, None, 0], points[:, None, 1]  # (M, 1)
    return (
        (x > boxes[None, :, 0] + margin)
        & (x < boxes[None, :, 1] - margin)
        & (y > boxes[None, :, 2] + margin)
        & (y < boxes[None, :, 3] - margin)
    )


@lru_cache(maxsize=8)
def _graph(rows: tuple[str, ...], radius: float) -> _Graph:
    layout = MazeLayout("maze", rows)
    walls = _cell_boxes(layout.wall_cells)  # (W, 4)
    boxes = walls + np.array([-radius, radius, -radius, radius])  # (W, 4)
    free = _cell_boxes(layout.free_cells)  # (C, 4)
    corners = np.concatenate(
        [boxes[:, [0, 2]], boxes[:, [0, 3]], boxes[:, [1, 2]], boxes[:, [1, 3]]]
    )  # (4W, 2)
    owner = np.tile(np.arange(len(boxes)), 4)  # (4W,) the box each corner belongs to
    # A convex corner of the union lies in no other box (closed); corners on another box's edge or
    # inside it are not bends a shortest path could use.
    x, y = corners[:, None, 0], corners[:, None, 1]
    in_closed = (
        (x >= boxes[None, :, 0] - _EPS)
        & (x <= boxes[None, :, 1] + _EPS)
        & (y >= boxes[None, :, 2] - _EPS)
        & (y <= boxes[None, :, 3] + _EPS)
    )  # (4W, W)
    in_closed[np.arange(len(corners)), owner] = False
    # Keep only corners that touch the maze's free cells (outer faces of the border are unreachable).
    in_maze = (
        (x >= free[None, :, 0] - _EPS)
        & (x <= free[None, :, 1] + _EPS)
        & (y >= free[None, :, 2] - _EPS)
        & (y <= free[None, :, 3] + _EPS)
    ).any(axis=1)
    nodes = np.unique(corners[~in_closed.any(axis=1) & in_maze].round(12), axis=0)  # (V, 2)
    V = len(nodes)
    dist = np.full((V, V), np.inf)
    if V:
        blocked = segments_blocked(nodes[:, None], nodes[None, :], boxes)  # (V, V)
        length = np.linalg.norm(nodes[:, None] - nodes[None, :], axis=-1)  # (V, V)
        dist = np.where(blocked, np.inf, length)
        for k in range(V):  # Floyd-Warshall: V is at most a few hundred even on the large maze
            dist = np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :])
    return _Graph(boxes=boxes, walls=walls, free=free, nodes=nodes, dist=dist)


def _layout_rows(maze) -> tuple[str, ...]:
    if isinstance(maze, MazeLayout):
        return tuple(maze.rows)
    if isinstance(maze, str):
        return MazeLayout.named(maze).rows
    rows = tuple(str(r) for r in maze)
    MazeLayout("maze", rows)  # validates
    return rows


def _to_free_space(points: np.ndarray, graph: _Graph) -> np.ndarray:
    """Move points (M, 2) lying inside the inflated walls to the nearest free point (M, 2)."""
    in_wall = _inside(points, graph.walls, _WALL_TOLERANCE).any(axis=1)
    in_maze = (
        (points[:, None, 0] >= graph.free[None, :, 0] - _WALL_TOLERANCE)
        & (points[:, None, 0] <= graph.free[None, :, 1] + _WALL_TOLERANCE)
        & (points[:, None, 1] >= graph.free[None, :, 2] - _WALL_TOLERANCE)
        & (points[:, None, 1] <= graph.free[None, :, 3] + _WALL_TOLERANCE)
    ).any(axis=1)
    bad = np.flatnonzero(in_wall | ~in_maze)
    if bad.size:
        raise ValueError(
            f"{bad.size} positions lie inside a wall or outside the maze, e.g. {points[bad[0]].tolist()} "
            "(positions are qpos (x, y), the state's first two values)"
        )
    out = points.copy()
    stuck = np.flatnonzero(_inside(points, graph.boxes, 0.0).any(axis=1))
    if stuck.size == 0:
        return out
    # The nearest free point of a rectilinear region keeps one coordinate (a projection on an
    # edge) or sits on a corner: both are on the grid of box edges crossed with the point itself.
    xs = np.unique(graph.boxes[:, :2])
    ys = np.unique(graph.boxes[:, 2:])
    for i in stuck:
        px, py = points[i]
        gx, gy = np.meshgrid(np.append(xs, px), np.append(ys, py), indexing="ij")
        candidates = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (G, 2)
        candidates = candidates[~_inside(candidates, graph.boxes, _EPS).any(axis=1)]
        out[i] = candidates[np.argmin(np.linalg.norm(candidates - points[i], axis=1))]
    return out


def geodesic_distance(maze, a, b, *, radius: float = AGENT_RADIUS, chunk: int = 512) -> np.ndarray:
    """Shortest-path distance through the maze between positions ``a[i]`` and ``b[i]``.

    Args:
        maze: a layout name ("umaze", "medium", "large"), a ``MazeLayout``, or its rows.
        a, b: (N, 2) or (2,) agent positions in qpos coordinates (``states[..., :2]``).
        radius: the agent's collision radius that the walls are inflated by.
        chunk: pairs handled at once (bounds memory: chunk x nodes x walls booleans).
    Returns:
        float64 (N,) distances in world units (inf only if the maze splits into parts).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scalar = a.ndim == 1 and b.ndim == 1
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape or a.shape[-1] != 2 or a.ndim != 2:
        raise ValueError(f"a and b must both be (N, 2) positions, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("positions contain NaN or inf")
    if radius < 0 or radius >= 0.5:
        raise ValueError(f"radius must be in [0, 0.5) so a one-cell corridor stays open, got {radius}")
    graph = _graph(_layout_rows(maze), float(radius))
    a_free, b_free = _to_free_space(a, graph), _to_free_space(b, graph)
    offset = np.linalg.norm(a - a_free, axis=1) + np.linalg.norm(b - b_free, axis=1)  # (N,)
    out = np.empty(len(a))
    nodes, D = graph.nodes, graph.dist
    for s in range(0, len(a), chunk):
        pa, pb = a_free[s : s + chunk], b_free[s : s + chunk]  # (M, 2)
        direct = np.linalg.norm(pa - pb, axis=1)  # (M,)
        direct[segments_blocked(pa, pb, graph.boxes)] = np.inf
        if len(nodes):
            to_a = np.linalg.norm(pa[:, None] - nodes[None], axis=-1)  # (M, V)
            to_a[segments_blocked(pa[:, None], nodes[None], graph.boxes)] = np.inf
            to_b = np.linalg.norm(pb[:, None] - nodes[None], axis=-1)  # (M, V)
            to_b[segments_blocked(pb[:, None], nodes[None], graph.boxes)] = np.inf
            via_a = (to_a[:, :, None] + D[None]).min(axis=1)  # (M, V): a -> ... -> node k
            direct = np.minimum(direct, (via_a + to_b).min(axis=1))
        out[s : s + chunk] = direct
    out += offset
    return out[0] if scalar else out
