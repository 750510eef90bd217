"""envs/: the world. Tasks are registered in `ENVS` (recipe section `task`)."""

from outrider.envs.base import ENVS, Demonstration, Env, Task, TaskConfig  # noqa: F401
from outrider.envs import jsonl_task, multisol, reasoning_gym_task  # noqa: E402,F401  (registers the built-ins)
