"""ALP-GMM [132] by hand (ALP on a tiny history, the uniform share, AIC picking k, sampling ∝ mean ALP), the
curriculum piece on a fake parametrised task, the missing-space error and kill -9 + `--resume`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import read_jsonl, tiny_recipe
from outrider.data import Episode, GroupIds, Turn
from outrider.envs.base import ENVS, ParamDim, ParamSpace
from outrider.errors import OutriderError
from outrider.explore import EXPLORE, ExploreContext
from outrider.explore.curriculum import ALPGMM, absolute_learning_progress, fit_gmm_aic, proportional_choice
from outrider.registry import BuildContext
from test_resume import RESUME_OVERRIDES, killed_run_resumes_like


def test_alp_on_a_tiny_history():
    xs = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    rs = np.array([0.0, 0.5, 1.0, 0.0, 0.0, 0.0])
    assert absolute_learning_progress(xs, rs, np.array([1.2]), 0.9) == pytest.approx(0.4)  # nearest: x = 1
    assert absolute_learning_progress(xs, rs, np.array([2.4]), 0.25) == pytest.approx(0.75)  # nearest: x = 2
    assert absolute_learning_progress(xs[:5], rs[:5], np.array([1.2]), 0.9) == 0.0  # 5 points: too few
    teacher = ALPGMM([0.0], [5.0], fit_rate=100)
    alps = [teacher.update(x, r) for x, r in zip(xs, rs)]
    assert alps == [0.0] * 6  # the 6th point sees 5 earlier ones: still 0
    assert teacher.update(np.array([4.9]), 0.5) == pytest.approx(0.5)  # nearest x = 5, r 0
    assert teacher.alps[-1] == pytest.approx(0.5) and teacher.gmm is None


def test_proportional_choice():
    rng = np.random.default_rng(0)
    draws = np.bincount([proportional_choice(np.array([0.0, 0.3, 0.1]), rng) for _ in range(4000)], minlength=3)
    assert draws[0] == 0 and draws[1] / 4000 == pytest.approx(0.75, abs=0.03)
    zero = np.bincount([proportional_choice(np.zeros(4), rng) for _ in range(4000)], minlength=4)
    assert np.all(np.abs(zero / 4000 - 0.25) < 0.03)  # all ALPs 0: uniform over the Gaussians


def test_aic_picks_two_on_two_clear_clusters():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal([0.0, 0.0], 0.1, (100, 2)), rng.normal([3.0, 3.0], 0.1, (100, 2))])
    gmm = fit_gmm_aic(data, [1, 2, 3, 4, 5], seed=0)
    assert int(gmm["k"]) == 2
    assert sorted(np.round(gmm["means"][:, 0]).tolist()) == [0.0, 3.0]
    assert gmm["weights"] == pytest.approx([0.5, 0.5], abs=0.01)
    # AIC = 2p − 2 ln L, p = k(d + d(d+1)/2) + k − 1 = 11 for k = 2, d = 2
    from sklearn.mixture import GaussianMixture

    ref = GaussianMixture(2, covariance_type="full", random_state=0).fit(data)
    assert float(gmm["aic"]) == pytest.approx(2 * 11 - 2 * ref.score(data) * len(data))


def test_uniform_share_and_sampling_by_mean_alp():
    teacher = ALPGMM([0.0, 0.0], [10.0, 10.0], fit_rate=4, random_share=0.2)
    rng = np.random.default_rng(0)
    assert all(teacher.sample(rng)[1] for _ in range(50))  # no GMM yet: the bootstrap is uniform
    teacher.points = [[1.0, 1.0]] * 4
    # two Gaussians: mean ALP 0 at (2, 2), 0.5 at (8, 8); the first is never chosen
    teacher.gmm = {"weights": np.array([0.9, 0.1]), "means": np.array([[2.0, 2.0, 0.0], [8.0, 8.0, 0.5]]),
                   "covariances": np.stack([np.eye(3) * 0.01] * 2), "k": np.array(2)}
    draws = [teacher.sample(rng) for _ in range(5000)]
    uniform = np.array([u for _, u in draws])
    assert uniform.mean() == pytest.approx(0.2, abs=0.015)
    guided = np.array([p for p, u in draws if not u])
    assert np.all(np.abs(guided - 8.0) < 0.6)
    teacher.gmm["means"][1, 0] = 30.0  # a Gaussian outside the box: its draws are clipped to it
    assert max(teacher.sample(rng)[0][0] for _ in range(200)) == 10.0


def test_refit_every_fit_rate_samples_and_state():
    teacher = ALPGMM([0.0], [1.0], fit_rate=20, ks=[2, 3])
    rng = np.random.default_rng(0)
    for i in range(39):
        x = teacher.sample(rng)[0]
        teacher.update(x, float(x[0] > 0.5) * (i / 40))
    assert teacher.fits == 1
    teacher.update(np.array([0.3]), 0.0)
    assert teacher.fits == 2 and int(teacher.gmm["k"]) in (2, 3) and teacher.gmm["means"].shape[1] == 2
    clone = ALPGMM([0.0], [1.0], fit_rate=20, ks=[2, 3])
    clone.load_state_dict(teacher.state_dict())
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [teacher.sample(a)[0].tolist() for _ in range(5)] == [clone.sample(b)[0].tolist() for _ in range(5)]


class FakeTask:
    """A 1-d parameter space [0, 1]: points above 0.5 are the 'hard' region; seed = 1000·index + round(10x)."""

    def param_space(self):
        return ParamSpace([ParamDim("x", 0.0, 1.0)])

    def param_seed(self, params, index):
        return 1000 * index + round(10 * params[0])

    def param_region(self, params):
        return "hard" if params[0] > 0.5 else "easy"


def fake_context(step: int) -> ExploreContext:
    def rollout(starts):
        return [Episode(group_id=s.group_id, seed=s.seed, turns=[Turn("q", [1], "a", [2])],
                        success=(s.seed % 1000) <= 5) for s in starts]

    return ExploreContext(rollout=rollout, score=lambda eps: None, next_seeds=lambda n: [], groups=GroupIds(),
                          rng=np.random.default_rng([0, step, 1]), step=step, task=FakeTask())


def build(**options):
    entry, cfg = EXPLORE.build({"name": "curriculum", "prompts_per_step": 8, "group_size": 2, "fit_rate": 16,
                                "max_k": 4, **options}, "explore")
    return entry.create(cfg, BuildContext(task=FakeTask(), where="explore"))


def test_piece_on_a_fake_task():
    piece = build()
    for step in range(1, 7):
        episodes, m = piece(fake_context(step))
        assert len(episodes) == 16 and len({e.group_id for e in episodes}) == 8
        assert m["explore/curriculum/share_easy"] + m["explore/curriculum/share_hard"] == pytest.approx(1.0)
        assert m["time/explore/teacher_s"] >= 0
    assert piece.teacher.fits == 3 and len(piece.teacher.points) == 48 and piece.sampled == 48
    seeds = {e.seed for e in episodes}
    assert all(s // 1000 >= 40 for s in seeds)  # the index keeps counting: distinct seeds per point
    assert piece.teacher.rewards[:8] == [float(round(10 * min(max(x, 0), 1)) <= 5) for x, in piece.teacher.points[:8]]
    clone = build()
    clone.load_state_dict(piece.state_dict())
    assert clone.state_dict()["teacher"]["points"] == piece.state_dict()["teacher"]["points"]
    uniform = build(teacher="uniform")
    _, m = uniform(fake_context(1))
    for step in range(2, 4):
        _, m = uniform(fake_context(step))
        assert m["explore/curriculum/uniform_share"] == 1.0 and m["explore/curriculum/gmm_k"] == 0.0
    assert uniform.teacher.fits == 0 and len(uniform.teacher.alps) == 24  # ALP logged, no GMM fitted


def test_task_without_a_parameter_space_is_one_line():
    entry, cfg = EXPLORE.build({"name": "curriculum"}, "explore")
    task_entry, task_cfg = ENVS.build({"name": "stepsum"}, "task")
    with pytest.raises(OutriderError, match=r"^explore.name: curriculum: task StepSumTask declares no parameter space"):
        entry.create(cfg, BuildContext(task=task_entry.fn(task_cfg), where="explore"))


@pytest.mark.parametrize("options", [{"max_k": 1, "min_k": 2}, {"fit_rate": 4, "max_k": 10}, {"teacher": "lp"},
                                     {"random_share": 1.5}])
def test_bad_options_are_rejected(options):
    with pytest.raises(OutriderError):
        EXPLORE.build({"name": "curriculum", **options}, "explore")


@pytest.mark.slow  # two runs of 40 small steps and a killed one, ~40 s
def test_killed_curriculum_run_resumes_to_identical_metrics(tmp_path):
    """The teacher's history, its GMM (refitted every 8 points) and the sample counter ride in checkpoints."""
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    task = {"name": "multisol", "min_digits": 2, "max_digits": 3, "random_label_digits": [3], "min_solutions": 4,
            "eval_size": 8, "template": "{question} ->"}
    explore = {"name": "curriculum", "prompts_per_step": 4, "group_size": 2, "fit_rate": 8, "max_k": 4}
    data = tiny_recipe(**dict(RESUME_OVERRIDES, explore=explore))
    data["task"] = task  # replaced, not merged into the tiny recipe's reasoning_gym task
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    reference = tmp_path / "A"
    Trainer(load_recipe(recipe), reference, quiet=True).run()
    rows = [r for r in read_jsonl(reference / "metrics.jsonl") if "explore/curriculum/alp_mean" in r]
    assert sum(r["explore/curriculum/refit"] for r in rows) >= 10
    assert any(r["explore/curriculum/uniform_share"] < 1 for r in rows)
    killed_run_resumes_like(reference, recipe, tmp_path)
