"""Where the shared fixtures live: ``../shared`` beside the repository (CI has the same layout)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
DINO_WM_POINT_MAZE = FIXTURES / "dino_wm" / "point_maze"
REFERENCE = SHARED / "reference"
