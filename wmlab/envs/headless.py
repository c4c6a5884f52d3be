"""Pick an OpenGL backend for MuJoCo before it is imported.

MuJoCo reads ``MUJOCO_GL`` once, at import time, so this must run before ``import mujoco``.
With no display we default to EGL (GPU or Mesa's software EGL, works out of the box here);
OSMesa is the fallback when no EGL library is installed (needs ``apt-get install libosmesa6``).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

_VALID_BACKENDS = ("egl", "osmesa", "glfw")
_STATE = {"mujoco_imported_first": False}


def configure_gl_backend() -> str:
    """Set ``MUJOCO_GL`` (and PyOpenGL's platform) for headless rendering; return the backend.

    A user's explicit ``MUJOCO_GL`` always wins. On Linux without ``DISPLAY`` we choose EGL.
    """
    backend = os.environ.get("MUJOCO_GL")
    if backend is None and "mujoco" in sys.modules:
        # Too late to choose: MuJoCo picked its GL platform when it was imported.
        _STATE["mujoco_imported_first"] = True
    if backend is None:
        on_linux_without_display = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
        if not on_linux_without_display:
            backend = "glfw"
        elif ctypes.util.find_library("EGL") is None and ctypes.util.find_library("OSMesa") is not None:
            backend = "osmesa"
        else:
            backend = "egl"
        os.environ["MUJOCO_GL"] = backend
    backend = backend.lower()
    if backend not in _VALID_BACKENDS:
        raise ValueError(f"MUJOCO_GL={backend!r} is not one of {_VALID_BACKENDS}")
    if backend in ("egl", "osmesa"):
        # PyOpenGL must agree with MuJoCo about the platform, otherwise context creation fails.
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def make_renderer(model, height: int, width: int):
    """Create a ``mujoco.Renderer``; if the GL backend cannot start, say what to install."""
    import mujoco

    try:
        return mujoco.Renderer(model, height=height, width=width)
    except Exception as egl_error:
        backend = os.environ.get("MUJOCO_GL", "")
        if _STATE["mujoco_imported_first"]:
            raise RuntimeError(
                "MuJoCo could not create a rendering context: `mujoco` was imported before wmlab could "
                "choose a headless OpenGL backend, so it used GLFW, which needs a display. Set "
                "MUJOCO_GL=egl in the environment, or import wmlab before mujoco."
            ) from egl_error
        raise RuntimeError(
            f"MuJoCo could not create an offscreen '{backend}' rendering context ({egl_error}). "
            "Headless rendering needs EGL (libegl1, usually present) or OSMesa: run "
            "`apt-get install libosmesa6` and set MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa."
        ) from egl_error
