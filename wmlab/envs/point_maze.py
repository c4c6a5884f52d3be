"""PointMaze: D4RL's maze2d point mass, as DINO-WM uses it, on the maintained ``mujoco`` bindings.

The MJCF below carries the exact parameters of D4RL's ``point_maze`` model (timestep 0.01, Euler,
no gravity, joint damping 1, motor gear 100, 5 physics substeps per env step, sphere r=0.1 with a
visible site r=0.2). ``step`` clips the action to [-1, 1] and the velocity to [-5, 5] before
simulating, as D4RL does. State = proprio = ``[x, y, vx, vy]`` float32 in qpos coordinates.

Rendering is a top-down free camera looking at the median of the geoms' positions from the
model's extent, which is how mujoco_py framed DINO-WM's frames. Shadows and multisampling are off
by default (they cost time and a top-down headlight casts no visible shadow); all camera values
can be overridden so ``wmlab check-render`` can fit them to a dataset rendered elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import gymnasium as gym
import numpy as np

from wmlab.envs.headless import configure_gl_backend, make_renderer
from wmlab.envs.maze_layouts import SAMPLER_MAX_SPEED, MazeLayout

configure_gl_backend()
import mujoco  # noqa: E402  (must follow configure_gl_backend: MuJoCo reads MUJOCO_GL at import)

#: Physics substeps per env step (mujoco_py MujocoEnv ``frame_skip``): one env step = 0.05 s.
PHYSICS_SUBSTEPS = 5
MAX_SPEED = 5.0
SUCCESS_RADIUS = 0.5
#: Where mujoco_py first rendered (``prepare_for_render``): the free camera's lookat is the
#: median of the geoms' positions at this state, so the particle's place enters that median.
CAMERA_SETUP_STATE = np.array([1.0856, 1.9746, 0.0098, 0.0217])
#: DINO-WM hides the target marker by moving its *rendered* position to world (11, 11) after
#: every forward pass. Its MJCF position stays at the origin, which matters: the origin enters the
#: model's bounding box, and so ``stat.extent`` (the camera distance, 9.73 for the U-maze).
OFF_SCREEN_TARGET_WORLD = np.array([11.0, 11.0, 0.0])


def build_mjcf(layout: MazeLayout) -> str:
    """The maze2d MJCF for ``layout`` as a string (parameters of reference section 9)."""
    walls = "\n".join(
        f'    <geom name="wall_{w}_{h}" type="box" material="wall" conaffinity="1" '
        f'pos="{w + 1.0} {h + 1.0} 0" size="0.5 0.5 0.2"/>'
        for w, h in layout.wall_cells
    )
    return f"""<mujoco model="point_maze_{layout.name}">
  <compiler inertiafromgeom="true" angle="radian" coordinate="local"/>
  <option timestep="0.01" gravity="0 0 0" iterations="20" integrator="Euler"/>
  <default>
    <joint damping="1" limited="false"/>
    <geom friction=".5 .1 .1" density="1000" margin="0.002" condim="1" contype="2" conaffinity="1"/>
  </default>
  <asset>
    <texture type="2d" name="groundplane" builtin="checker" rgb1="0.2 0.3 0.4" rgb2="0.1 0.2 0.3"
             width="100" height="100"/>
    <texture name="skybox" type="skybox" builtin="gradient" rgb1=".4 .6 .8" rgb2="0 0 0"
             width="800" height="800" mark="random" markrgb="1 1 1"/>
    <material name="groundplane" texture="groundplane" texrepeat="20 20"/>
    <material name="wall" rgba=".7 .5 .3 1"/>
    <material name="target" rgba=".6 .3 .3 1"/>
  </asset>
  <visual>
    <headlight ambient=".4 .4 .4" diffuse=".8 .8 .8" specular="0.1 0.1 0.1"/>
    <map znear=".01"/>
    <quality shadowsize="2048"/>
  </visual>
  <worldbody>
    <geom name="ground" type="plane" size="40 40 0.25" pos="0 0 -0.1" contype="1" conaffinity="0"
          material="groundplane"/>
    <body name="particle" pos="1.2 1.2 0">
      <geom name="particle_geom" type="sphere" size="0.1" rgba="0 0 1 0" contype="1"/>
      <site name="particle_site" pos="0 0 0" size="0.2" rgba="0.3 0.6 0.3 1"/>
      <joint name="ball_x" type="slide" pos="0 0 0" axis="1 0 0"/>
      <joint name="ball_y" type="slide" pos="0 0 0" axis="0 1 0"/>
    </body>
    <site name="target_site" pos="0 0 0" size="0.2" material="target"/>
{walls}
  </worldbody>
  <actuator>
    <motor joint="ball_x" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
    <motor joint="ball_y" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
  </actuator>
</mujoco>
"""


@dataclass
class CameraSpec:
    """Free-camera placement. ``None`` fields take mujoco_py's defaults for this model."""

    distance: float | None = None  # default: model.stat.extent
    lookat: tuple[float, float, float] | None = None  # default: median of geom_xpos at setup state
    azimuth: float = 90.0
    elevation: float = -90.0
    fovy: float | None = None  # default: the model's free-camera fovy (45)

    @classmethod
    def from_config(cls, cfg: dict | None) -> CameraSpec:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"distance", "lookat", "azimuth", "elevation", "fovy"}
        if unknown:
            raise ValueError(f"unknown camera keys {sorted(unknown)}")
        if cfg.get("lookat") is not None:
            cfg["lookat"] = tuple(float(v) for v in cfg["lookat"])
        return cls(**{k: v for k, v in cfg.items() if v is not None})


@dataclass
class RenderSpec:
    img_size: int = 224
    shadows: bool = False
    antialias: bool = False
    #: mujoco_py's ``sim.render`` returned OpenGL's bottom-up rows; ``mujoco.Renderer`` flips them
    #: to top-down. Set True to reproduce bottom-up frames if a dataset was stored that way.
    flip_vertical: bool = False
    camera: CameraSpec = field(default_factory=CameraSpec)
    #: Radius of the drawn agent disc (the ``particle_site``; visual only, physics unchanged).
    #: 0.2 is D4RL's; at 64 px that is a 3 px dot, so the CPU demo draws it larger.
    agent_radius: float = 0.2


class PointMazeEnv(gym.Env):
    """Goal-conditioned point mass in a maze; observation = {"visual", "proprio"}.

    Observation: ``visual`` uint8 (H, W, 3) when ``visual_obs`` else absent; ``proprio`` float32 (4,).
    Action: float32 (2,) force in [-1, 1]. Reward: 1.0 within 0.5 of the goal if one is set.
    The env never terminates by itself; wrap it in a TimeLimit or let the harness stop it.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 20}
    version = "1"

    def __init__(
        self,
        maze: str = "umaze",
        img_size: int = 224,
        visual_obs: bool = True,
        shadows: bool = False,
        antialias: bool = False,
        flip_vertical: bool = False,
        camera: dict | None = None,
        agent_radius: float = 0.2,
        render_mode: str = "rgb_array",
    ) -> None:
        if int(img_size) < 8:
            raise ValueError(f"img_size must be >= 8 pixels, got {img_size}")
        self.layout = MazeLayout.named(maze)
        self.render_spec = RenderSpec(
            img_size=int(img_size),
            shadows=bool(shadows),
            antialias=bool(antialias),
            flip_vertical=bool(flip_vertical),
            camera=CameraSpec.from_config(camera),
            agent_radius=float(agent_radius),
        )
        if not self.render_spec.agent_radius > 0:
            raise ValueError(f"agent_radius must be > 0, got {agent_radius}")
        self.visual_obs = bool(visual_obs)
        self.render_mode = render_mode
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.layout))
        self.data = mujoco.MjData(self.model)
        # Set after compiling so the model's extent (the default camera distance) stays D4RL's.
        agent_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, "particle_site")
        self.model.site_size[agent_site, 0] = self.render_spec.agent_radius
        self._renderer = None
        self._target_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, "target_site")
        self._camera = self._make_camera()
        self._goal: np.ndarray | None = None

        size = self.render_spec.img_size
        spaces = {"proprio": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)}
        if self.visual_obs:
            spaces["visual"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> np.ndarray:
        """Current ``[x, y, vx, vy]`` float32 (4,)."""
        return np.concatenate([self.data.qpos, self.data.qvel]).astype(np.float32)

    def set_state(self, state) -> None:
        """Set ``[x, y, vx, vy]`` exactly (no noise) and recompute positions."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape != (4,) or not np.all(np.isfinite(state)):
            raise ValueError(f"PointMaze state must be 4 finite numbers [x, y, vx, vy], got {state}")
        self.data.qpos[:] = state[:2]
        self.data.qvel[:] = state[2:4]
        mujoco.mj_forward(self.model, self.data)

    def get_physics(self) -> np.ndarray:
        """The full integration state (time, qpos, qvel, warm-start, ...) as float64 (n,), so a harness
        can interleave many episodes on one env and continue each exactly where it stopped."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        out = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, self.data, out, spec)
        return out

    def set_physics(self, physics: np.ndarray) -> None:
        """Restore a ``get_physics`` snapshot."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.asarray(physics, dtype=np.float64)
        size = mujoco.mj_stateSize(self.model, spec)
        if physics.shape != (size,):
            raise ValueError(f"physics snapshot has shape {physics.shape}, expected ({size},)")
        mujoco.mj_setState(self.model, self.data, physics, spec)
        mujoco.mj_forward(self.model, self.data)

    def simulate(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Final ``[x, y, vx, vy]`` (M, 4) of M action sequences actions (M, K, 2) from states (M, 4),
        with ``step``'s rule (clip action to +-1 and velocity to +-5, then 5 substeps), simulated in
        C by ``mujoco.rollout`` without touching this env's own state. For planning baselines."""
        from mujoco import rollout

        states = np.asarray(states, dtype=np.float64)
        actions = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        M, K, A = actions.shape
        if states.shape != (M, 4) or A != 2:
            raise ValueError(
                f"simulate needs states (M, 4) and actions (M, K, 2), got {states.shape}, {actions.shape}"
            )
        spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        scratch = mujoco.MjData(self.model)
        template = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, scratch, template, spec)
        full = np.repeat(template[None], M, axis=0)  # (M, nstate): [time, qpos(2), qvel(2), ...]
        full[:, 1:5] = states
        if not hasattr(self, "_rollout_data"):
            self._rollout_data = [
                mujoco.MjData(self.model) for _ in range(max(1, min(4, os.cpu_count() or 1)))
            ]
        for k in range(K):
            np.clip(full[:, 3:5], -MAX_SPEED, MAX_SPEED, out=full[:, 3:5])
            control = np.repeat(actions[:, k : k + 1], PHYSICS_SUBSTEPS, axis=1)  # (M, 5, 2)
            out, _ = rollout.rollout(self.model, self._rollout_data, full, control, persistent_pool=True)
            full = out[:, -1]  # (M, nstate)
        return full[:, 1:5].astype(np.float32)

    def set_goal(self, goal) -> None:
        """Remember a goal state (4,) so ``step`` can report reward and ``info['success']``."""
        self._goal = None if goal is None else np.asarray(goal, dtype=np.float64).reshape(4)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset; ``options={"state": [x, y, vx, vy]}`` sets the state exactly (evaluation),
        otherwise a random free cell + U(-0.1, 0.1) position noise and N(0, 0.1) velocity
        (D4RL's ``reset_model``, used for the random-policy dataset)."""
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        options = options or {}
        if options.get("state") is not None:
            self.set_state(options["state"])
        else:
            cells = self.layout.free_cells
            cell = cells[int(self.np_random.integers(len(cells)))]
            # D4RL uses the cell *index* as qpos, i.e. 0.2 off the cell centre in world terms.
            qpos = np.asarray(cell, dtype=np.float64) + self.np_random.uniform(-0.1, 0.1, size=2)
            qvel = self.np_random.normal(0.0, 0.1, size=2)
            self.set_state(np.concatenate([qpos, qvel]))
        if "goal" in options:
            self.set_goal(options["goal"])
        return self._observation(), self._info()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (2,):
            raise ValueError(f"PointMaze action must have shape (2,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"PointMaze action must be finite, got {action}")
        action = np.clip(action, -1.0, 1.0)
        # D4RL clips the velocity *before* simulating, then runs 5 substeps with the clipped action.
        np.clip(self.data.qvel, -MAX_SPEED, MAX_SPEED, out=self.data.qvel)
        mujoco.mj_forward(self.model, self.data)
        self.data.ctrl[:] = action
        mujoco.mj_step(self.model, self.data, nstep=PHYSICS_SUBSTEPS)
        info = self._info()
        reward = float(info.get("success", False))
        return self._observation(), reward, False, False, info

    def render(self) -> np.ndarray:
        """Top-down RGB frame, uint8 (H, W, 3)."""
        if self._renderer is None:
            self._renderer = self._make_renderer()
        self.data.site_xpos[self._target_site] = OFF_SCREEN_TARGET_WORLD
        self._renderer.update_scene(self.data, camera=self._camera)
        frame = self._renderer.render()
        return np.ascontiguousarray(frame[::-1]) if self.render_spec.flip_vertical else frame

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # ------------------------------------------------------------------ goal-conditioned API
    def sample_start_goal(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """DINO-WM's ``random_state`` start/goal pair for ``seed``: two float64 (4,) states.

        One ``np.random.RandomState(seed)`` stream: x then y ~ U(low, high) until the point lies in
        the accepted region, then vx, vy ~ U(-5.2262554, 5.2262554); the start first, then the goal.
        """
        rs = np.random.RandomState(seed)
        low, high = self.layout.sampler_bounds

        def draw() -> np.ndarray:
            while True:
                x = rs.uniform(low, high)
                y = rs.uniform(low, high)
                if self.layout.sampler_accepts(x, y):
                    break
            vx = rs.uniform(-SAMPLER_MAX_SPEED, SAMPLER_MAX_SPEED)
            vy = rs.uniform(-SAMPLER_MAX_SPEED, SAMPLER_MAX_SPEED)
            return np.array([x, y, vx, vy])

        start = draw()
        goal = draw()
        return start, goal

    @staticmethod
    def evaluate(goal, state) -> dict:
        """``success``: xy distance < 0.5; ``state_dist``: L2 distance over all 4 dimensions."""
        goal = np.asarray(goal, dtype=np.float64).reshape(-1)
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        return {
            "success": bool(np.linalg.norm(goal[:2] - state[:2]) < SUCCESS_RADIUS),
            "state_dist": float(np.linalg.norm(goal[:4] - state[:4])),
        }

    # ------------------------------------------------------------------ internals
    def _observation(self) -> dict:
        obs = {"proprio": self.state}
        if self.visual_obs:
            obs["visual"] = self.render()
        return obs

    def _info(self) -> dict:
        info = {"state": self.state}
        if self._goal is not None:
            info.update(self.evaluate(self._goal, info["state"]))
        return info

    def default_camera(self) -> dict:
        """mujoco_py's free camera for this model: lookat = median geom position, distance = extent."""
        saved = (self.data.qpos.copy(), self.data.qvel.copy())
        self.set_state(CAMERA_SETUP_STATE)
        lookat = np.median(self.data.geom_xpos, axis=0)
        self.data.qpos[:], self.data.qvel[:] = saved
        mujoco.mj_forward(self.model, self.data)
        return {
            "distance": float(self.model.stat.extent),
            "lookat": tuple(float(v) for v in lookat),
            "azimuth": 90.0,
            "elevation": -90.0,
            "fovy": float(self.model.vis.global_.fovy),
        }

    def camera_values(self) -> dict:
        """The camera actually used (defaults filled in)."""
        values = self.default_camera()
        spec = self.render_spec.camera
        for key in values:
            if getattr(spec, key) is not None:
                values[key] = getattr(spec, key)
        return values

    def _make_camera(self):
        values = self.camera_values()
        camera = mujoco.MjvCamera()
        camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        camera.lookat[:] = values["lookat"]
        camera.distance = values["distance"]
        camera.azimuth = values["azimuth"]
        camera.elevation = values["elevation"]
        # The free camera's field of view lives in the model, not in MjvCamera.
        self.model.vis.global_.fovy = values["fovy"]
        return camera

    def _make_renderer(self):
        size = self.render_spec.img_size
        # Multisampling is fixed when the GL context is made, so set it before creating one.
        self.model.vis.quality.offsamples = 4 if self.render_spec.antialias else 0
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, size)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, size)
        renderer = make_renderer(self.model, size, size)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = bool(self.render_spec.shadows)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = False
        return renderer
