"""envs/: the world. Tasks are registered in `ENVS` (recipe section `task`); every module here registers its own."""

from outrider.envs.base import ENVS, Demonstration, Env, Task, TaskConfig  # noqa: F401
from outrider.registry import register_package

register_package(__name__, __path__)
