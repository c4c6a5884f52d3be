"""wmlab: latent world models that plan, and the study of which representation plans best."""

import sys

__version__ = "0.1.0"

if "gymnasium" in sys.modules:
    # `gymnasium.make("wmlab:wmlab/PointMaze-UMaze-v0")` imports this module first: register the ids then
    # (cheap: gymnasium is already loaded; without it, importing wmlab stays free of gymnasium).
    import wmlab.envs  # noqa: F401  (registers on import)
