"""Environments of the World Models agent, each seen as 64x64 RGB frames with a continuous action vector.

- ``car_racing``: gymnasium ``CarRacing-v3`` (optional extra: ``gymnasium[box2d]``). 96x96 frames, rows 0:84
  kept (the status bar dropped), resized to 64x64, colours inverted (as the reference code). Action
  (steer, gas, brake) as the env takes it. 1000-step TimeLimit.
- ``take_cover``: ViZDoom ``VizdoomTakeCover-v1`` (optional extra: ``vizdoom``). 240x320 frames, rows 0:200
  kept (the reference's 0:400 of 480), resized to 64x64, inverted. Action: one value v in [-1, 1];
  v < -1/3 moves left, v > 1/3 moves right, else stay. The 2100-step cap that the cfg lacks is added here.
- ``dodge``: a tiny numpy TakeCover analogue (no optional package): fireballs fall down an 8x8 grid, the
  agent on the bottom row moves left/stay/right with the same action convention as ``take_cover``; +1 per
  step alive, hit = episode end. It lets the whole pipeline run (and be tested) anywhere.

Every env here: ``reset(seed=) -> (frame uint8 (64, 64, 3), info)``, ``step(action float (A,)) -> (frame,
reward, terminated, truncated, info)``; class attributes ``action_dim``, ``max_steps``, ``has_done``
(whether M gets a done head) and ``controller_to_action`` (tanh controller outputs -> env actions).
"""

from __future__ import annotations

from typing import ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces

FRAME = 64
EXTRAS_HINT = 'pip install "wmlab[worldmodels]"'


def preprocess(frame: np.ndarray, rows: tuple[int, int], invert: bool) -> np.ndarray:
    """Crop rows, resize to 64x64 (bilinear, PIL), optionally invert: uint8 (H, W, 3) -> uint8 (64, 64, 3)."""
    from PIL import Image

    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got {frame.shape}")
    cropped = np.ascontiguousarray(frame[rows[0] : rows[1]])
    out = np.asarray(Image.fromarray(cropped).resize((FRAME, FRAME), Image.BILINEAR))
    return 255 - out if invert else out


class WMEnv(gymnasium.Env):
    """Base: a 64x64x3 uint8 observation and a Box(-1, 1) action of ``action_dim`` values."""

    action_dim = 1
    max_steps = 1000
    has_done = True
    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0, 255, (FRAME, FRAME, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)

    @staticmethod
    def controller_to_action(y: np.ndarray) -> np.ndarray:
        """tanh controller outputs (..., out) -> actions (..., action_dim): identity for one-value envs."""
        return y

    def check_action(self, action) -> np.ndarray:
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (self.action_dim,) or not np.isfinite(action).all():
            raise ValueError(
                f"{type(self).__name__} takes {self.action_dim} finite action values, got {action}"
            )
        return action


def discrete_move(v: float) -> int:
    """One action value -> -1 (left), 0 (stay), +1 (right) by the paper's +-1/3 thresholds."""
    return -1 if v < -1 / 3 else (1 if v > 1 / 3 else 0)


class DodgeEnv(WMEnv):
    """Fireballs fall one row per step; a hit on the agent's cell ends the episode. +1 reward per step.

    ``grid`` x ``grid`` cells of 64 // grid pixels (centred in the 64x64 frame). Colours: fireballs red,
    the agent green on a black background, at full contrast so that a small V learns them in minutes.
    """

    action_dim = 1
    has_done = True
    GRID = 8  # the default grid
    BACKGROUND, FIREBALL, AGENT = (0, 0, 0), (255, 60, 40), (40, 255, 60)

    def __init__(self, max_steps: int = 100, spawn_prob: float = 0.5, grid: int = GRID) -> None:
        super().__init__()
        if not 3 <= int(grid) <= FRAME:
            raise ValueError(f"dodge grid must be 3..{FRAME} cells, got {grid}")
        self.max_steps = int(max_steps)
        self.spawn_prob = float(spawn_prob)
        self.grid = int(grid)
        self.rng = np.random.default_rng(0)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.agent = self.grid // 2
        self.balls = np.zeros((self.grid, self.grid), bool)  # (row, col); row grid-1 is the agent's
        self.t = 0
        return self.render(), {}

    def step(self, action):
        move = discrete_move(float(self.check_action(action)[0]))
        self.agent = int(np.clip(self.agent + move, 0, self.grid - 1))
        self.balls[1:] = self.balls[:-1].copy()  # everything falls one row
        self.balls[0] = False
        if self.rng.random() < self.spawn_prob:
            self.balls[0, self.rng.integers(self.grid)] = True
        self.t += 1
        hit = bool(self.balls[-1, self.agent])
        return self.render(), 1.0, hit, self.t >= self.max_steps and not hit, {}

    def render(self) -> np.ndarray:
        cell = FRAME // self.grid
        img = np.empty((self.grid, self.grid, 3), np.uint8)
        img[:] = self.BACKGROUND
        img[self.balls] = self.FIREBALL
        img[-1, self.agent] = self.AGENT
        frame = np.empty((FRAME, FRAME, 3), np.uint8)
        frame[:] = self.BACKGROUND
        o = (FRAME - cell * self.grid) // 2
        side = cell * self.grid
        frame[o : o + side, o : o + side] = np.repeat(np.repeat(img, cell, 0), cell, 1)
        return frame  # (64, 64, 3)


class CarRacingEnv(WMEnv):
    """gymnasium CarRacing-v3 as 64x64 frames (crop 0:84, resize, invert)."""

    action_dim = 3
    has_done = False  # the dream for Car has no reward or done head (visualisation only)

    def __init__(self, max_steps: int = 1000, invert: bool = True, **kwargs) -> None:
        super().__init__()
        try:
            import Box2D  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"car_racing needs Box2D: {EXTRAS_HINT} (or pip install 'gymnasium[box2d]')"
            ) from err
        self.max_steps = int(max_steps)
        self.invert = bool(invert)
        self.env = gymnasium.make("CarRacing-v3", max_episode_steps=self.max_steps, **kwargs)
        self.action_space = spaces.Box(np.array([-1, 0, 0], np.float32), np.ones(3, np.float32))

    @staticmethod
    def controller_to_action(y: np.ndarray) -> np.ndarray:
        """(..., 3) tanh outputs -> steer = y0, gas = (y1 + 1) / 2, brake = clip(y2, 0, 1)."""
        y = np.asarray(y)
        return np.stack([y[..., 0], (y[..., 1] + 1) / 2, np.clip(y[..., 2], 0, 1)], -1)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return preprocess(obs, (0, 84), self.invert), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(self.check_action(action))
        return preprocess(obs, (0, 84), self.invert), float(reward), terminated, truncated, info

    def close(self):
        self.env.close()


class TakeCoverEnv(WMEnv):
    """ViZDoom TakeCover as 64x64 frames (crop 0:200 of 240, resize, invert) with a 2100-step cap."""

    action_dim = 1
    has_done = True

    def __init__(self, max_steps: int = 2100, invert: bool = True, frame_skip: int = 1, **kwargs) -> None:
        super().__init__()
        try:
            import vizdoom.gymnasium_wrapper  # noqa: F401  (registers the Vizdoom* ids)
        except ImportError as err:
            raise ImportError(f"take_cover needs ViZDoom: {EXTRAS_HINT} (or pip install vizdoom)") from err
        self.max_steps = int(max_steps)
        self.invert = bool(invert)
        # the scenario cfg has no episode_timeout: TimeLimit adds the paper's 2100-step cap
        self.env = gymnasium.make(
            "VizdoomTakeCover-v1", frame_skip=frame_skip, max_episode_steps=self.max_steps, **kwargs
        )
        buttons = [str(b) for b in self.env.unwrapped.game.get_available_buttons()]
        pressed = [tuple(int(v) for v in combo) for combo in self.env.unwrapped.button_map]
        left, right = buttons.index("Button.MOVE_LEFT"), buttons.index("Button.MOVE_RIGHT")

        def index(left_on: int, right_on: int) -> int:
            want = [0] * len(buttons)
            want[left], want[right] = left_on, right_on
            return pressed.index(tuple(want))

        # the wrapper's Discrete(3) order is its own (noop, right, left today): look it up, never assume
        self.discrete = {-1: index(1, 0), 0: index(0, 0), 1: index(0, 1)}

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        return preprocess(obs["screen"], (0, 200), self.invert), info

    def step(self, action):
        move = discrete_move(float(self.check_action(action)[0]))
        obs, reward, terminated, truncated, info = self.env.step(self.discrete[move])
        return preprocess(obs["screen"], (0, 200), self.invert), float(reward), terminated, truncated, info

    def close(self):
        self.env.close()


WM_ENVS: dict[str, type[WMEnv]] = {"car_racing": CarRacingEnv, "take_cover": TakeCoverEnv, "dodge": DodgeEnv}


def env_class(name: str) -> type[WMEnv]:
    if name not in WM_ENVS:
        raise ValueError(f"unknown World Models env {name!r}; known: {', '.join(sorted(WM_ENVS))}")
    return WM_ENVS[name]


def make_wm_env(name: str, **kwargs) -> WMEnv:
    """Build a World Models env by name (``car_racing``, ``take_cover``, ``dodge``)."""
    return env_class(name)(**kwargs)
