"""Geodesic (shortest-path) distance in the maze: hand-computed U-maze answers and bounds."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from wmlab.envs.geodesic import AGENT_RADIUS, geodesic_distance
from wmlab.envs.maze_layouts import MazeLayout

# U-maze cells in qpos: top corridor x = 0.8 (y = 0.8 .. 2.8), the bend (1.8, 2.8), bottom corridor
# x = 2.8. The wall block between the corridors spans x in [1.3, 2.3], y in [0.3, 2.3]; inflated by
# the agent radius 0.1 its free-side corners are (1.2, 2.4) and (2.4, 2.4).


def test_same_corridor_is_euclidean():
    a = np.array([[0.8, 0.8], [0.7, 0.9], [2.8, 0.8], [0.8, 2.8]])
    b = np.array([[0.8, 2.8], [1.0, 2.5], [2.8, 2.8], [2.8, 2.8]])
    expected = np.linalg.norm(a - b, axis=1)
    np.testing.assert_allclose(geodesic_distance("umaze", a, b), expected, atol=1e-9)


def test_around_the_bend_is_the_sum_of_segments():
    corner_a, corner_b = np.array([1.2, 2.4]), np.array([2.4, 2.4])
    start, goal = np.array([0.8, 0.8]), np.array([2.8, 0.8])
    by_hand = (
        np.linalg.norm(start - corner_a)
        + np.linalg.norm(corner_a - corner_b)
        + np.linalg.norm(corner_b - goal)
    )
    assert by_hand == pytest.approx(2 * np.sqrt(0.4**2 + 1.6**2) + 1.2)
    d = geodesic_distance("umaze", [start, goal], [goal, start])
    np.testing.assert_allclose(d, [by_hand, by_hand], atol=1e-9)
    # Into the bend cell: one corner.
    bend = np.array([1.8, 2.8])
    expected = np.linalg.norm(start - corner_a) + np.linalg.norm(corner_a - bend)
    assert geodesic_distance("umaze", start, bend) == pytest.approx(expected, abs=1e-9)


def test_a_position_pressed_into_the_wall_margin_is_moved_out_and_counted():
    # y = 0.35 lies 0.05 inside the border wall's inflated face at y = 0.4.
    assert geodesic_distance("umaze", [0.8, 0.35], [0.8, 0.8]) == pytest.approx(0.45)


def test_positions_in_walls_or_outside_are_errors():
    with pytest.raises(ValueError, match="inside a wall or outside the maze"):
        geodesic_distance("umaze", [[1.8, 1.8]], [[0.8, 0.8]])
    with pytest.raises(ValueError, match="inside a wall or outside the maze"):
        geodesic_distance("umaze", [[9.0, 9.0]], [[0.8, 0.8]])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        geodesic_distance("umaze", np.zeros((3, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="unknown maze layout"):
        geodesic_distance("nope", [0.8, 0.8], [0.8, 0.8])


def _cell_steps(layout: MazeLayout, start, goal) -> int:
    free = set(layout.free_cells)
    seen, queue = {start: 0}, deque([start])
    while queue:
        w, h = queue.popleft()
        for nxt in ((w + 1, h), (w - 1, h), (w, h + 1), (w, h - 1)):
            if nxt in free and nxt not in seen:
                seen[nxt] = seen[(w, h)] + 1
                queue.append(nxt)
    return seen[goal]


@pytest.mark.parametrize("maze", ["medium", "large"])
def test_bounded_by_euclidean_and_by_the_cell_path(maze):
    """Between cell centres the cell-to-cell path (1 per step) is feasible, so it bounds the
    geodesic from above; the straight line bounds it from below. Symmetric, zero on the diagonal."""
    layout = MazeLayout.named(maze)
    rng = np.random.default_rng(0)
    cells = layout.free_cells
    pairs = [(cells[i], cells[j]) for i, j in rng.integers(len(cells), size=(60, 2))]
    a = np.array([layout.cell_center_qpos(c) for c, _ in pairs])
    b = np.array([layout.cell_center_qpos(c) for _, c in pairs])
    d = geodesic_distance(maze, a, b)
    upper = np.array([_cell_steps(layout, p, q) for p, q in pairs], dtype=float)
    assert np.all(d >= np.linalg.norm(a - b, axis=1) - 1e-9)
    assert np.all(d <= upper + 1e-9)
    np.testing.assert_allclose(geodesic_distance(maze, b, a), d, atol=1e-9)
    np.testing.assert_allclose(geodesic_distance(maze, a, a), 0.0, atol=1e-12)
    assert AGENT_RADIUS == 0.1
