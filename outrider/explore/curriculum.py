"""Curricula over a task's parameter space: the ALP-GMM teacher [132] and its uniform-sampling baseline.

A parametrised task (`Task.param_space`, e.g. multisol's (digits, sum_fraction)) builds a prompt at any point of
its space. Each step the teacher picks ``prompts_per_step`` points; each becomes one prompt (`Task.param_seed`)
with a group of ``group_size`` rollouts, and the group's mean outcome is the teacher's reward for that point.

ALP-GMM, as the authors' code has it (flowersteam/teachDeepRL, ``teachers/algos/alp_gmm.py``):

- absolute learning progress of a sampled point x with reward r: alp = |r − r'|, r' the reward of the nearest
  earlier point (Euclidean, over the whole history); 0 while the history holds 5 points or fewer;
- every ``fit_rate`` samples (after ``fit_rate`` uniform bootstrap samples) GMMs with k = 2..10 full-covariance
  components are fitted on the latest ``fit_rate`` rows [x, alp] and the one of lowest AIC is kept;
- sampling: with probability ``random_share`` (0.2), or during the bootstrap, uniform in the box; else a
  Gaussian is chosen with probability proportional to its mean ALP (its mean's last coordinate; uniformly when
  they sum to 0), a point is drawn from it, its ALP coordinate dropped and the point clipped to the box.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from outrider.data import Episode, groups_of, has_reward_variance
from outrider.envs.base import ParamSpace, require_param_space
from outrider.explore import EXPLORE, ExploreConfig, ExploreContext
from outrider.registry import BuildContext, Piece

ALP_MIN_HISTORY = 5  # the authors' EmpiricalALPComputer: alp = 0 until the history holds more than 5 points


def absolute_learning_progress(history_x: np.ndarray, history_r: np.ndarray, x: np.ndarray, r: float) -> float:
    """|r − r_j| with j the nearest earlier point to x (the first one on ties) [132]; 0 while the history holds
    `ALP_MIN_HISTORY` points or fewer."""
    if len(history_x) <= ALP_MIN_HISTORY:
        return 0.0
    j = int(np.argmin(((history_x - x) ** 2).sum(axis=1)))
    return float(abs(r - history_r[j]))


def fit_gmm_aic(data: np.ndarray, ks: list[int], seed: int) -> dict[str, np.ndarray]:
    """Full-covariance GMMs with each k in `ks` fitted on `data` (rows [x, alp]; scikit-learn, one EM init, as
    the authors); returns the lowest-AIC one as arrays (weights, means, covariances) and its k. AIC = 2p − 2 ln L
    with p = k(d + d(d+1)/2) + k − 1 free parameters (scikit-learn's count)."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    best: dict[str, np.ndarray] | None = None
    best_aic = np.inf
    # one BLAS thread: on a few hundred rows a pool of threads costs ~50x more than it saves (26 s vs 0.5 s
    # for nine fits on 128 rows, where the cores are shared)
    with np.errstate(under="ignore"), threadpool_limits(1):
        for k in ks:
            if k > len(data):
                continue
            gmm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed, n_init=1).fit(data)
            aic = gmm.aic(data)
            if aic < best_aic:  # ties keep the smaller k, as argmin does
                best_aic = aic
                best = {"weights": gmm.weights_.copy(), "means": gmm.means_.copy(),
                        "covariances": gmm.covariances_.copy(), "k": np.array(k), "aic": np.array(aic)}
    if best is None:
        raise ValueError(f"no k in {ks} fits {len(data)} points")
    return best


def proportional_choice(values: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability values_i / Σ values; uniform when they sum to 0 (the authors' rule)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = values.sum()
    if total <= 0:
        return int(rng.integers(len(values)))
    return int(rng.choice(len(values), p=values / total))


class ALPGMM:
    """The ALP-GMM teacher [132] on a box [lows, highs]: `sample` a point, `update` with its reward. Its history
    (points, rewards, ALPs) and current GMM are its `state_dict`."""

    def __init__(self, lows: list[float], highs: list[float], fit_rate: int = 250, ks: list[int] | None = None,
                 random_share: float = 0.2, seed: int = 0):
        self.lows, self.highs = np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64)
        self.fit_rate, self.random_share, self.seed = fit_rate, random_share, seed
        self.ks = list(range(2, 11)) if ks is None else list(ks)
        self.points: list[list[float]] = []
        self.rewards: list[float] = []
        self.alps: list[float] = []
        self.gmm: dict[str, np.ndarray] | None = None
        self.fits = 0
        self._array: np.ndarray | None = None

    def _history(self) -> np.ndarray:
        """The points as one array with room for the next (doubled when full), so the nearest-neighbour search
        does not rebuild it from the list at every sample."""
        array = self._array
        if array is None or len(array) < len(self.points) + 1:
            array = np.zeros((max(64, 2 * (len(self.points) + 1)), len(self.lows)))
            if self.points:
                array[:len(self.points)] = self.points
        return array

    def uniform(self, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.lows, self.highs)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """A point, and whether it was drawn uniformly (bootstrap or the random share)."""
        if self.gmm is None or len(self.points) < self.fit_rate or rng.random() < self.random_share:
            return self.uniform(rng), True
        idx = proportional_choice(self.gmm["means"][:, -1], rng)
        point = rng.multivariate_normal(self.gmm["means"][idx], self.gmm["covariances"][idx])[:-1]
        return np.clip(point, self.lows, self.highs), False

    def update(self, point: np.ndarray, reward: float, fit: bool = True) -> float:
        """Record a sampled point's reward; returns its ALP. Refits the GMMs every `fit_rate` samples (unless
        `fit` is off: the uniform baseline logs ALP without paying for GMMs it does not use)."""
        n = len(self.points)
        self._array = self._history()
        alp = absolute_learning_progress(self._array[:n], np.asarray(self.rewards),
                                         np.asarray(point, dtype=np.float64), reward)
        self.points.append([float(v) for v in point])
        self._array[n] = self.points[-1]
        self.rewards.append(float(reward))
        self.alps.append(alp)
        if fit and len(self.points) >= self.fit_rate and len(self.points) % self.fit_rate == 0:
            rows = np.column_stack([np.asarray(self.points[-self.fit_rate:]), self.alps[-self.fit_rate:]])
            self.gmm = fit_gmm_aic(rows, self.ks, self.seed)
            self.fits += 1
        return alp

    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "rewards": list(self.rewards), "alps": list(self.alps),
                "gmm": None if self.gmm is None else {k: v.copy() for k, v in self.gmm.items()}, "fits": self.fits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [list(p) for p in state["points"]]
        self._array = None
        self.rewards, self.alps = list(state["rewards"]), list(state["alps"])
        self.gmm = None if state["gmm"] is None else {k: np.asarray(v) for k, v in state["gmm"].items()}
        self.fits = int(state["fits"])


class CurriculumConfig(ExploreConfig):
    teacher: Literal["alp_gmm", "uniform"] = Field("alp_gmm", description="alp_gmm: the ALP-GMM teacher [132]; "
                                                   "uniform: every point uniform in the task's parameter box (the "
                                                   "baseline).")
    fit_rate: int = Field(250, ge=2, description="Samples (one per group) between two GMM fits, the window each "
                                                 "fit sees, and the uniform bootstrap before the first (the "
                                                 "authors' fit_rate = nb_random).")
    min_k: int = Field(2, ge=1, description="Fewest Gaussians tried at each fit (the authors' range 2..10).")
    max_k: int = Field(10, ge=1, description="Most Gaussians tried at each fit; the lowest AIC wins.")
    random_share: float = Field(0.2, ge=0, le=1, description="Share of points drawn uniformly after the "
                                                             "bootstrap (the authors' random_task_ratio).")
    signal: Literal["success", "reward"] = Field("success", description="The teacher's reward for a point: the "
                                                 "group's mean success (0/1) or mean total reward (keep it between 0 "
                                                 "and 1: ALP is an absolute difference).")

    @model_validator(mode="after")
    def _ks(self) -> "CurriculumConfig":
        if self.max_k < self.min_k:
            raise ValueError(f"max_k ({self.max_k}) must be at least min_k ({self.min_k})")
        if self.max_k > self.fit_rate:
            raise ValueError(f"max_k ({self.max_k}) must not exceed fit_rate ({self.fit_rate}): a fit of k "
                             "Gaussians needs at least k points")
        return self


@EXPLORE.register("curriculum", config=CurriculumConfig)
class Curriculum(Piece):
    """Prompts chosen over the task's parameter space by a teacher: ALP-GMM [132] (absolute learning progress
    |r − r_nearest earlier|, GMMs on [x, ALP] refitted every fit_rate samples with k by AIC, a Gaussian drawn ∝
    its mean ALP, 20% uniform) or uniform. One group per point; the teacher's history and GMM are its state."""

    def __init__(self, cfg: CurriculumConfig, build: BuildContext | None = None):
        super().__init__(cfg, build)
        task = build.task if build is not None else None
        self.space: ParamSpace | None = require_param_space(task, "explore.name: curriculum") if task else None
        lows, highs = self.space.box() if self.space else ([0.0], [1.0])
        seed = build.seed if build is not None else 0
        self.teacher = ALPGMM(lows, highs, cfg.fit_rate, list(range(cfg.min_k, cfg.max_k + 1)), cfg.random_share,
                              seed)
        self.sampled = 0  # points so far: the index that makes each point's seed distinct
        self.regions: set[str] = set()  # regions seen so far, so a region's share is logged (as 0) every step

    def __call__(self, ctx: ExploreContext) -> tuple[list[Episode], dict[str, float]]:
        cfg: CurriculumConfig = self.cfg
        task = ctx.task
        if self.space is None:
            self.space = require_param_space(task, "explore.name: curriculum")
        t0 = time.perf_counter()
        drawn = [self.teacher.sample(ctx.rng) if cfg.teacher == "alp_gmm" else (self.teacher.uniform(ctx.rng), True)
                 for _ in range(cfg.prompts_per_step)]
        points = [self.space.snap(list(p)) for p, _ in drawn]
        seeds = [task.param_seed(p, self.sampled + i) for i, p in enumerate(points)]
        self.sampled += len(seeds)
        teacher_s = time.perf_counter() - t0
        starts = ctx.group_starts(seeds, cfg.group_size)
        episodes = ctx.rollout(starts)
        ctx.score(episodes)
        groups = groups_of(episodes)
        group_of = [starts[i * cfg.group_size].group_id for i in range(len(seeds))]
        signals = []
        for gid in group_of:
            group = groups.get(gid, [])
            values = [float(e.success) if cfg.signal == "success" else e.total_reward() for e in group]
            signals.append(float(np.mean(values)) if values else 0.0)
        t1 = time.perf_counter()
        fits = self.teacher.fits
        alps = [self.teacher.update(p, r, fit=cfg.teacher == "alp_gmm") for (p, _), r in zip(drawn, signals)]
        teacher_s += time.perf_counter() - t1
        metrics: dict[str, float] = {
            "explore/groups_sampled": float(len(seeds)),
            "explore/informative_groups": sum(has_reward_variance(g) for g in groups.values()) / max(len(groups), 1),
            "explore/curriculum/alp_mean": float(np.mean(alps)),
            "explore/curriculum/uniform_share": sum(u for _, u in drawn) / len(drawn),
            "explore/curriculum/gmm_k": float(self.teacher.gmm["k"]) if self.teacher.gmm is not None else 0.0,
            "explore/curriculum/refit": float(self.teacher.fits > fits),
            "time/explore/teacher_s": teacher_s,
        }
        for j, name in enumerate(self.space.names):
            metrics[f"explore/curriculum/{name}_mean"] = float(np.mean([p[j] for p in points]))
        regions = [task.param_region(p) for p in points]
        self.regions |= {r for r in regions if r is not None}
        for region in sorted(self.regions):
            metrics[f"explore/curriculum/share_{region}"] = regions.count(region) / len(regions)
        return episodes, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "sampled": self.sampled, "regions": sorted(self.regions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.sampled = int(state["sampled"])
        self.regions = set(state["regions"])

