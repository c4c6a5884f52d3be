"""Maze layouts of D4RL's maze2d (as used by DINO-WM), and geometry derived from them.

Coordinates. A layout is a list of strings; row ``w`` column ``h`` is cell ``(w, h)``. A wall cell's
box sits at world ``(w + 1, h + 1)``. The point mass body sits at world ``(1.2, 1.2)`` and its
slide joints measure *relative* to it, so an agent in cell ``(w, h)``'s centre has
``qpos = (w - 0.2, h - 0.2)``. All public functions here work in qpos coordinates, the ones the
state vector ``[x, y, vx, vy]`` uses. That 0.2 offset is D4RL's, kept for compatibility.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

WALL, EMPTY, GOAL = "#", "O", "G"

#: Offset between a cell index and the qpos of that cell's centre (body at 1.2, wall at w + 1).
CELL_TO_QPOS_OFFSET = 1.0 - 1.2

#: Half-width of the region DINO-WM's ``random_state`` sampler accepts around each free cell
#: centre and along each corridor between adjacent free cells (U-maze: x in [0.5, 1.1] etc.).
SAMPLER_HALF_WIDTH = 0.3

#: Velocity range of DINO-WM's start/goal sampler (observed max |v| in the released dataset).
SAMPLER_MAX_SPEED = 5.2262554

LAYOUTS: dict[str, tuple[str, ...]] = {
    "umaze": ("#####", "#GOO#", "###O#", "#OOO#", "#####"),
    "medium": (
        "########",
        "#OO##OO#",
        "#OO#OOO#",
        "##OOO###",
        "#OO#OOO#",
        "#O#OO#O#",
        "#OOO#OG#",
        "########",
    ),
    "large": (
        "############",
        "#OOOO#OOOOO#",
        "#O##O#O#O#O#",
        "#OOOOOO#OOO#",
        "#O####O###O#",
        "#OO#O#OOOOO#",
        "##O#O#O#O###",
        "#OO#OOO#OGO#",
        "############",
    ),
}


@dataclass(frozen=True)
class MazeLayout:
    """A parsed maze: which cells are walls, and the regions the samplers draw from."""

    name: str
    rows: tuple[str, ...]

    @classmethod
    def named(cls, name: str) -> MazeLayout:
        if name not in LAYOUTS:
            raise ValueError(f"unknown maze layout {name!r}; choose one of {sorted(LAYOUTS)}")
        return cls(name, LAYOUTS[name])

    def __post_init__(self) -> None:
        widths = {len(r) for r in self.rows}
        if len(widths) != 1:
            raise ValueError(f"maze {self.name!r} rows have different lengths {sorted(widths)}")
        bad = {c for r in self.rows for c in r} - {WALL, EMPTY, GOAL}
        if bad:
            raise ValueError(f"maze {self.name!r} has unknown tiles {sorted(bad)}")

    @cached_property
    def wall_cells(self) -> list[tuple[int, int]]:
        return [(w, h) for w, row in enumerate(self.rows) for h, c in enumerate(row) if c == WALL]

    @cached_property
    def free_cells(self) -> list[tuple[int, int]]:
        """Empty cells in sorted order, then goal cells (D4RL's ``empty_and_goal_locations``)."""
        empty = sorted((w, h) for w, row in enumerate(self.rows) for h, c in enumerate(row) if c == EMPTY)
        goal = [(w, h) for w, row in enumerate(self.rows) for h, c in enumerate(row) if c == GOAL]
        return empty + goal

    def cell_center_qpos(self, cell: tuple[int, int]) -> np.ndarray:
        """qpos (x, y) of the centre of ``cell`` (float64, shape (2,))."""
        return np.asarray(cell, dtype=np.float64) + CELL_TO_QPOS_OFFSET

    @cached_property
    def sampler_boxes(self) -> np.ndarray:
        """Axis-aligned boxes (K, 4) = [x_lo, x_hi, y_lo, y_hi] in qpos whose union is accepted.

        One box per free cell (centre +- 0.3) and one per pair of adjacent free cells (the
        corridor between their centres, half-width 0.3). On the U-maze this union is exactly
        DINO-WM's hand-written rule. Bounds are rounded to 1e-9 so that 0.8 - 0.3 is 0.5.
        """
        free = set(self.free_cells)
        boxes = []
        for w, h in sorted(free):
            for dw, dh in ((0, 0), (1, 0), (0, 1)):
                other = (w + dw, h + dh)
                if other not in free:
                    continue
                (x0, y0), (x1, y1) = self.cell_center_qpos((w, h)), self.cell_center_qpos(other)
                boxes.append(
                    [
                        min(x0, x1) - SAMPLER_HALF_WIDTH,
                        max(x0, x1) + SAMPLER_HALF_WIDTH,
                        min(y0, y1) - SAMPLER_HALF_WIDTH,
                        max(y0, y1) + SAMPLER_HALF_WIDTH,
                    ]
                )
        return np.round(np.asarray(boxes, dtype=np.float64), 9)

    @cached_property
    def sampler_bounds(self) -> tuple[float, float]:
        """(low, high) of the uniform draw for x and y: the bounding square of the accepted region.

        DINO-WM draws x and y from the same U(0.5, 3.1) on the (square) U-maze.
        """
        boxes = self.sampler_boxes
        return float(boxes[:, [0, 2]].min()), float(boxes[:, [1, 3]].max())

    def sampler_accepts(self, x: float, y: float) -> bool:
        """True if (x, y) lies in the sampler's accepted region (closed boxes)."""
        b = self.sampler_boxes
        inside = (b[:, 0] <= x) & (x <= b[:, 1]) & (b[:, 2] <= y) & (y <= b[:, 3])
        return bool(inside.any())
