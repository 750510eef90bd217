"""Offline trajectories with pairwise preferences: the file format, its reader, and a generator on MiniGrid.

A dataset is two JSONL files in one directory (one JSON object a line):

* ``trajectories.jsonl``: ``{"id": "t0", "observations": [[0, 1, ...], ...], "actions": [2, 0, ...]}`` with
  optional ``"return"`` (a number, for diagnostics only: no method reads it), ``"source"`` (a label such as
  ``expert``) and ``"layout"`` (a string naming the level layout, checked to be disjoint from evaluation layouts).
  ``observations`` has one numeric vector per action, all of one length across the file; actions are integers
  in ``[0, n_actions)``.
  A text dataset (the tiny-LM policy, `offline.text`) has strings instead: ``"observations": ["K2 H12\\n",
  "1:1\\n"]`` (what the env showed before each action) and ``"actions": ["1", "2"]`` (the env's text actions).
* ``pairs.jsonl``: ``{"a": "t0", "b": "t7", "preferred": "a" | "b" | "tie"}``, ids of two trajectories.

A malformed line is one `OutriderError` naming the file, the line and the field.

The generator (`generate`) rolls out mixed-quality policies on train layouts of a MiniGrid level: the BFS expert,
an ε-noisy expert (a uniformly random action with probability ε, else the expert's next action replanned from the
current state) and a uniformly random policy; the preference of a pair is its true returns' order (equal returns:
a tie) with each strict label flipped at rate ``label_noise``. Observations are the full grid (object type and
door state one-hot per cell) plus the agent's position, direction and whether it carries something.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from outrider.errors import OutriderError
from outrider.jsonl import json_objects

N_ACTIONS = 6  # MiniGrid's left, right, forward, pickup, drop, toggle (done is never needed)
OBJECTS = ("empty", "wall", "door", "key", "goal")  # the objects of DoorKey levels; others map to "empty"
PREFERRED = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass
class Trajectory:
    """One trajectory: observations [T, D] (float32), the actions taken in them [T], and optional metadata."""

    id: str
    observations: np.ndarray | list[str]
    actions: np.ndarray | list[str]
    ret: float | None = None
    source: str = ""
    layout: str = ""


@dataclass
class Dataset:
    """Trajectories and pairs ``(i, j, p)``: indices into `trajectories`, p = P(i preferred) ∈ {1, 0, 0.5}."""

    trajectories: list[Trajectory]
    pairs: list[tuple[int, int, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def obs_dim(self) -> int:
        return int(self.trajectories[0].observations.shape[1])  # type: ignore[union-attr]

    @property
    def is_text(self) -> bool:
        return isinstance(self.trajectories[0].observations, list)


# --- the file format -------------------------------------------------------------------------------------------
def _compact(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def save_dataset(ds: Dataset, out: Path) -> None:
    """Write `ds` as ``trajectories.jsonl`` + ``pairs.jsonl`` (+ ``meta.json``) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trajectories.jsonl", "w") as f:
        for t in ds.trajectories:
            if isinstance(t.observations, list):
                row: dict[str, Any] = {"id": t.id, "observations": list(t.observations), "actions": list(t.actions)}
            else:
                row = {"id": t.id, "observations": [[_compact(v) for v in o] for o in t.observations],
                       "actions": [int(a) for a in t.actions]}
            if t.ret is not None:
                row["return"] = round(float(t.ret), 6)
            row.update({k: v for k, v in (("source", t.source), ("layout", t.layout)) if v})
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    names = {v: k for k, v in PREFERRED.items()}
    with open(out / "pairs.jsonl", "w") as f:
        for i, j, p in ds.pairs:
            f.write(json.dumps({"a": ds.trajectories[i].id, "b": ds.trajectories[j].id, "preferred": names[p]}) + "\n")
    (out / "meta.json").write_text(json.dumps(ds.meta, indent=1) + "\n")


def _number_list(where: str, key: str, v: Any) -> list[float]:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise OutriderError(f"{where}: '{key}' must be a list of numbers")
    return v


def _string_list(where: str, key: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise OutriderError(f"{where}: '{key}' must be a list of strings (a text dataset: the first line's "
                            "observations are strings)")
    return v


def load_dataset(path: str | Path, n_actions: int = N_ACTIONS) -> Dataset:
    """Read a dataset directory (see the module docstring); every problem is a one-line error naming the line."""
    d = Path(path)
    tpath, ppath = d / "trajectories.jsonl", d / "pairs.jsonl"
    trajs: list[Trajectory] = []
    index: dict[str, int] = {}
    dim = None
    for n, row in json_objects(str(tpath), "data.path"):
        where = f"{tpath}:{n}"
        extra = set(row) - {"id", "observations", "actions", "return", "source", "layout"}
        if extra:
            raise OutriderError(f"{where}: unknown field '{sorted(extra)[0]}' (valid: id, observations, actions, "
                                "return, source, layout)")
        for key in ("id", "observations", "actions"):
            if key not in row:
                raise OutriderError(f"{where}: missing field '{key}'")
        tid = row["id"]
        if not isinstance(tid, str) or not tid:
            raise OutriderError(f"{where}: 'id' must be a non-empty string")
        if tid in index:
            raise OutriderError(f"{where}: id '{tid}' repeats line of trajectory {index[tid] + 1}")
        obs = row["observations"]
        if not isinstance(obs, list) or not obs:
            raise OutriderError(f"{where}: 'observations' must be a non-empty list of number lists or of strings")
        text = isinstance(obs[0], str)
        if trajs and text != isinstance(trajs[0].observations, list):
            raise OutriderError(f"{where}: 'observations' must be {'strings' if not text else 'number lists'}, as on "
                                "the file's first line")
        if text:
            rows, acts = _string_list(where, "observations", obs), _string_list(where, "actions", row["actions"])
        else:
            acts = _number_list(where, "actions", row["actions"])
            rows = [_number_list(f"{where}: observations[{k}]", "observations", o) for k, o in enumerate(obs)]
        if len(rows) != len(acts):
            raise OutriderError(f"{where}: 'observations' has {len(rows)} rows but 'actions' has {len(acts)}; one "
                                "observation per action")
        if not text:
            dim = dim if dim is not None else len(rows[0])
            if any(len(o) != dim for o in rows):
                raise OutriderError(f"{where}: 'observations' rows must all have length {dim} (the file's first row)")
            if any(not float(a).is_integer() or not 0 <= a < n_actions for a in acts):
                raise OutriderError(f"{where}: 'actions' must be integers in [0, {n_actions})")
        ret = row.get("return")
        if ret is not None and (not isinstance(ret, (int, float)) or isinstance(ret, bool)):
            raise OutriderError(f"{where}: 'return' must be a number")
        for key in ("source", "layout"):
            if not isinstance(row.get(key, ""), str):
                raise OutriderError(f"{where}: '{key}' must be a string")
        index[tid] = len(trajs)
        trajs.append(Trajectory(tid, rows if text else np.asarray(rows, dtype=np.float32),
                                acts if text else np.asarray(acts, dtype=np.int64),  # type: ignore[arg-type]
                                None if ret is None else float(ret), row.get("source", ""), row.get("layout", "")))
    if not trajs:
        raise OutriderError(f"{tpath}: no trajectories")
    pairs: list[tuple[int, int, float]] = []
    for n, row in json_objects(str(ppath), "data.path"):
        where = f"{ppath}:{n}"
        for key in ("a", "b", "preferred"):
            if key not in row:
                raise OutriderError(f"{where}: missing field '{key}'")
        extra = set(row) - {"a", "b", "preferred"}
        if extra:
            raise OutriderError(f"{where}: unknown field '{sorted(extra)[0]}' (valid: a, b, preferred)")
        for key in ("a", "b"):
            if row[key] not in index:
                raise OutriderError(f"{where}: '{key}' names no trajectory ('{row[key]}' is not an id in {tpath.name})")
        if row["preferred"] not in PREFERRED:
            raise OutriderError(f"{where}: 'preferred' must be \"a\", \"b\" or \"tie\", not {row['preferred']!r}")
        pairs.append((index[row["a"]], index[row["b"]], PREFERRED[row["preferred"]]))
    if not pairs:
        raise OutriderError(f"{ppath}: no pairs")
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else {}
    return Dataset(trajs, pairs, meta)


# --- generation on MiniGrid -------------------------------------------------------------------------------------
def features(env: Any) -> np.ndarray:
    """The full, Markov state of an unwrapped DoorKey-style MiniGrid env as a flat 0/1 vector."""
    from minigrid.core.constants import IDX_TO_OBJECT

    enc = env.grid.encode()  # [W, H, 3]: object index, colour, state (0 open, 1 closed, 2 locked)
    w, h = enc.shape[:2]
    obj = np.zeros((w, h, len(OBJECTS) + 3), dtype=np.float32)
    for x in range(w):
        for y in range(h):
            name = IDX_TO_OBJECT[int(enc[x, y, 0])]
            obj[x, y, OBJECTS.index(name) if name in OBJECTS else 0] = 1.0
            if name == "door":
                obj[x, y, len(OBJECTS) + int(enc[x, y, 2])] = 1.0
    pos = np.zeros((w, h), dtype=np.float32)
    pos[tuple(env.agent_pos)] = 1.0
    pose = np.zeros(5, dtype=np.float32)
    pose[int(env.agent_dir)] = 1.0
    pose[4] = float(env.carrying is not None)
    return np.concatenate([obj.ravel(), pos.ravel(), pose])


def layout_id(env: Any) -> str:
    """A name of the current layout (the grid and the agent's start pose), the unit of train/eval disjointness."""
    raw = env.grid.encode().tobytes() + bytes([*map(int, env.agent_pos), int(env.agent_dir)])
    return hashlib.sha256(raw).hexdigest()[:16]


def make_env(env_id: str, split: str) -> Any:
    """A MiniGrid env whose reset(seed) draws train or held-out (eval) layouts (outrider.envs.minigrid_text)."""
    from outrider.envs.minigrid_text import MiniGridTextEnv

    return MiniGridTextEnv(env_id, "compact", split)  # type: ignore[arg-type]


def expert_action(env: Any, rng: random.Random) -> int:
    from outrider.envs.minigrid_expert import PlanError, plan
    from outrider.envs.minigrid_text import ACTION_IDS

    try:
        steps = plan(env)
    except PlanError:  # e.g. the key dropped where it cannot be picked up again: act at random
        return rng.randrange(N_ACTIONS)
    return ACTION_IDS[steps[0]] if steps else rng.randrange(N_ACTIONS)


def rollout(tenv: Any, seed: int, epsilon: float, horizon: int, rng: random.Random) -> tuple[Trajectory, str]:
    """One episode on the layout of `seed`: the expert's action, or a random one with probability `epsilon`."""
    tenv.reset(seed)
    env = tenv.env
    layout = layout_id(env)
    obs, acts, ret = [], [], 0.0
    for _ in range(horizon):
        a = rng.randrange(N_ACTIONS) if rng.random() < epsilon else expert_action(env, rng)
        obs.append(features(env))
        acts.append(a)
        _, r, terminated, truncated, _ = env.step(a)
        ret += float(r)
        if terminated or truncated:
            break
    return Trajectory("", np.stack(obs), np.asarray(acts, dtype=np.int64), ret, "", layout), layout


def generate(env_id: str, sources: dict[str, tuple[int, float]], n_pairs: int, label_noise: float,
             horizon: int, seed: int) -> Dataset:
    """`sources` maps a name to (trajectories, ε) (ε = 0: the expert, 1: random); pairs are drawn uniformly among
    distinct trajectories and labelled by the true return, each strict label flipped with prob. `label_noise`."""
    rng = random.Random(seed)
    tenv = make_env(env_id, "train")
    trajs: list[Trajectory] = []
    for name, (count, eps) in sources.items():
        for _ in range(count):
            t, _ = rollout(tenv, rng.randrange(2**30), eps, horizon, rng)
            t.id, t.source = f"t{len(trajs)}", name
            trajs.append(t)
    pairs, flipped = draw_pairs(trajs, n_pairs, label_noise, rng)
    by_source = {n: float(np.mean([t.ret for t in trajs if t.source == n])) for n in sources}
    meta = {"env": env_id, "horizon": horizon, "seed": seed, "label_noise": label_noise, "flipped": flipped,
            "mean_return": by_source, "ties": sum(p == 0.5 for *_, p in pairs)}
    return Dataset(trajs, pairs, meta)


def draw_pairs(trajs: list[Trajectory], n_pairs: int, label_noise: float, rng: random.Random
               ) -> tuple[list[tuple[int, int, float]], int]:
    """`n_pairs` pairs of distinct trajectories drawn uniformly, labelled by the true return (equal: a tie), each
    strict label flipped with probability `label_noise`; returns the pairs and the number flipped."""
    pairs, flipped = [], 0
    for _ in range(n_pairs):
        i, j = rng.sample(range(len(trajs)), 2)
        ri, rj = trajs[i].ret or 0.0, trajs[j].ret or 0.0
        p = 0.5 if math.isclose(ri, rj) else float(ri > rj)
        if p != 0.5 and rng.random() < label_noise:
            p, flipped = 1.0 - p, flipped + 1
        pairs.append((i, j, p))
    return pairs, flipped
