"""Custom rewards from a recipe (`python` components, entry-point plugins) and the isolation every score component
runs under: a raising, NaN/inf-returning or malformed component is scored as configured and counted, never
crashing the run."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from conftest import read_jsonl, tiny_recipe
from outrider import registry
from outrider.data import Batch, Episode, Turn
from outrider.errors import OutriderError
from outrider.recipe import parse_recipe
from outrider.registry import Needs
from outrider.score import SCORE, Component, ComponentConfig, compose, compose_packed, score_step_metrics

REWARDS = '''
import math

def judge(prompt, response, info, bonus=0.0):
    """len(response) + bonus; raises on 'x', NaN on 'n', inf on 'i', None on 'z'."""
    if response == "x":
        raise KeyError("no such key")
    if response == "n":
        return math.nan
    if response == "i":
        return math.inf
    if response == "z":
        return None
    return len(response) + bonus

def per_turn(prompt, response, info):
    return [float(t.reward) for t in info["episode"].turns]

def ranked(episodes, scale=1.0):
    """Group-level: rank of each episode's response length within the batch."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i].response))
    return [scale * order.index(i) for i in range(len(episodes))]

def context(prompt, response, info):
    return float(prompt == "q?" and info["reference"] == "ab" and info["env_reward"] == 0.5)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module `rewards_<test>.py` in the working directory; returns its module name."""
    name = f"user_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def episode(response: str, turns: int = 1, reward: float = 0.0) -> Episode:
    ep = Episode(group_id=0, seed=0)
    for k in range(turns):
        last = k == turns - 1
        ep.turns.append(Turn("q?" if k == 0 else "o", [1], response if last else "", [5] * max(len(response), 1)
                             if last else [5], reward=reward, info={"reference": "ab"} if last else {}))
    return ep


def component(section: dict, weight: float = 1.0, where: str = "score[0]") -> Component:
    piece = SCORE.create(section, where=where)
    return Component(piece.name, piece, weight, where)


def test_per_episode_function_with_kwargs_weight_and_info(user_module):
    comp = component({"name": "python", "function": f"{user_module}:judge", "kwargs": {"bonus": 0.5}}, weight=2.0)
    ctx = component({"name": "python", "function": f"{user_module}:context"})
    eps = [episode("ab", reward=0.5), episode("abcd")]
    compose(eps, [comp, ctx])
    assert comp.name == "judge"
    assert [e.rewards["trajectory"]["judge"] for e in eps] == [2.0 * 2.5, 2.0 * 4.5]
    assert [e.rewards["trajectory"]["context"] for e in eps] == [1.0, 0.0]  # prompt, reference, env_reward
    assert score_step_metrics([comp]) == {"score/judge/errors": 0.0, "score/judge/nonfinite": 0.0}


def test_step_level_and_batch_forms(user_module):
    steps = component({"name": "python", "function": f"{user_module}:per_turn", "level": "step"})
    ranked = component({"name": "python", "function": f"{user_module}:ranked", "batch": True,
                        "kwargs": {"scale": 10.0}})
    eps = [episode("abc", turns=2, reward=0.25), episode("a", turns=3, reward=1.0)]
    compose(eps, [steps, ranked])
    assert eps[0].rewards["step"]["per_turn"] == [0.25, 0.25]
    assert eps[1].rewards["step"]["per_turn"] == [1.0, 1.0, 1.0]
    assert [e.rewards["trajectory"]["ranked"] for e in eps] == [10.0, 0.0]


def test_failures_are_scored_as_configured_and_counted_per_step(user_module, caplog):
    comp = component({"name": "python", "function": f"{user_module}:judge", "on_error": -1.0,
                      "on_nonfinite": -2.0}, weight=3.0)
    eps = [episode(r) for r in ("ab", "x", "n", "i", "z", "abc")]
    compose(eps[:3], [comp])  # two calls in one step (dynamic sampling scores several times) add up
    compose(eps[3:], [comp])
    assert [e.rewards["trajectory"]["judge"] for e in eps] == [6.0, -3.0, -6.0, -6.0, -3.0, 9.0]
    assert score_step_metrics([comp]) == {"score/judge/errors": 2.0, "score/judge/nonfinite": 2.0}
    assert score_step_metrics([comp]) == {"score/judge/errors": 0.0, "score/judge/nonfinite": 0.0}  # next step
    logged = [r.getMessage() for r in caplog.records if r.name == "outrider.score"]
    assert len(logged) == 1 and "score[0] (judge): KeyError: 'no such key'" in logged[0]  # once per component


def test_default_scores_failures_zero(user_module):
    comp = component({"name": "python", "function": f"{user_module}:judge"})
    eps = [episode("x"), episode("n")]
    compose(eps, [comp])
    assert [e.rewards["trajectory"]["judge"] for e in eps] == [0.0, 0.0]


@pytest.mark.parametrize("response,option,fragment", [
    ("x", "on_error", "score[1] (judge): KeyError: 'no such key'; set score[1].on_error to a number"),
    ("n", "on_nonfinite", "score[1] (judge): returned nan; set score[1].on_nonfinite to a number"),
])
def test_raise_policy_stops_with_one_line(user_module, response, option, fragment):
    comp = component({"name": "python", "function": f"{user_module}:judge", option: "raise"}, where="score[1]")
    with pytest.raises(OutriderError) as e:
        compose([episode("ab"), episode(response)], [comp])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_max_failed_steps_counts_consecutive_failing_steps(user_module):
    comp = component({"name": "python", "function": f"{user_module}:judge", "max_failed_steps": 2})
    compose([episode("x")], [comp])
    score_step_metrics([comp])  # one failing step
    compose([episode("ab")], [comp])
    score_step_metrics([comp])  # a good step resets the count
    compose([episode("n")], [comp])
    score_step_metrics([comp])
    compose([episode("x")], [comp])
    with pytest.raises(OutriderError, match=r"score\[0\] \(judge\): failed in 2 consecutive steps "
                                            r"\(max_failed_steps=2\); last: KeyError: 'no such key'"):
        score_step_metrics([comp])


@SCORE.register("test_flaky_builtin", config=ComponentConfig)
def _flaky(episodes, cfg):
    raise RuntimeError("verifier service down")


@SCORE.register("test_wrong_length", config=ComponentConfig, needs=Needs(level="token"))
def _wrong_length(episodes, cfg):
    return [[1.0] for _ in episodes]


@SCORE.register("test_packed_nan", config=ComponentConfig, needs=Needs(packed=True))
def _packed_nan(batch, cfg):
    rewards = torch.ones_like(batch.token_rewards)
    rewards[0, 1] = math.nan
    return rewards, {}


@SCORE.register("test_packed_raises", config=ComponentConfig, needs=Needs(packed=True))
def _packed_raises(batch, cfg):
    raise ValueError("reward model crashed")


def test_every_registered_component_is_isolated_the_same_way():
    flaky, wrong = component({"name": "test_flaky_builtin", "on_error": 0.5}), component({"name": "test_wrong_length"})
    eps = [episode("ab"), episode("abc")]
    compose(eps, [flaky, wrong])
    assert [e.rewards["trajectory"]["test_flaky_builtin"] for e in eps] == [0.5, 0.5]
    assert eps[0].rewards["token"]["test_wrong_length"] == [0.0, 0.0]  # the error value on the last token
    assert score_step_metrics([flaky, wrong]) == {
        "score/test_flaky_builtin/errors": 2.0, "score/test_flaky_builtin/nonfinite": 0.0,
        "score/test_wrong_length/errors": 2.0, "score/test_wrong_length/nonfinite": 0.0}


def test_packed_components_are_isolated():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    batch = Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4), action_mask=mask,
                  token_rewards=torch.zeros(2, 4), step_index=torch.zeros(2, 4, dtype=torch.long),
                  group_index=torch.zeros(2, dtype=torch.long), sample_weight=torch.ones(2))
    nan = component({"name": "test_packed_nan", "on_nonfinite": -4.0}, weight=2.0)
    crashed = component({"name": "test_packed_raises", "on_error": 1.5}, where="score[1]")
    metrics = compose_packed(batch, [nan, crashed])
    expected = torch.tensor([[0.0, -8.0, 2.0, 0.0], [0.0, 2.0, 2.0, 2.0]]) + torch.tensor(
        [[0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 1.5]])  # the error value on each row's last trained token
    assert torch.equal(batch.token_rewards, expected)
    assert metrics["score/test_packed_nan/nonfinite"] == 1.0 and metrics["score/test_packed_nan/errors"] == 0.0
    assert metrics["score/test_packed_raises/errors"] == 2.0
    assert metrics["reward/test_packed_raises"] == pytest.approx(1.5)


@pytest.mark.parametrize("function,fragment", [
    ("{mod}:missing", "score[0].function: module '{mod}' has no attribute 'missing'"),
    ("no_such_module_xyz:judge", "score[0].function: cannot import module 'no_such_module_xyz' "
                                 "(ModuleNotFoundError"),
    ("{mod}:NOT_A_FUNCTION", "score[0].function: '{mod}:NOT_A_FUNCTION' is not callable"),
    ("judge", "score[0].function: expected 'module:function'"),
])
def test_a_function_that_cannot_be_used_is_one_line(user_module, function, fragment):
    recipe = tiny_recipe(score=[{"name": "python", "function": function.format(mod=user_module)}])
    with pytest.raises(OutriderError) as e:
        parse_recipe(recipe)
    assert fragment.format(mod=user_module) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("option,value", [("on_error", float("nan")), ("on_nonfinite", float("inf")),
                                          ("on_error", "ignore")])
def test_fallback_values_must_be_finite_numbers_or_raise(option, value):
    with pytest.raises(OutriderError, match=rf"score\[0\]\.{option}"):
        parse_recipe(tiny_recipe(score=[{"name": "verifier", option: value}]))


def test_a_run_with_a_failing_reward_completes_and_logs_its_counts(user_module, tmp_path):
    from outrider.trainer import Trainer

    (tmp_path / f"{user_module}_run.py").write_text(textwrap.dedent('''
        import math
        calls = [0]
        def flaky(prompt, response, info):
            calls[0] += 1
            if calls[0] % 3 == 0:
                raise RuntimeError("judge timed out")
            return math.nan if calls[0] % 3 == 1 else 1.0
    '''))
    recipe = parse_recipe(tiny_recipe(score=[{"name": "verifier"}, {"name": "python",
                                                                    "function": f"{user_module}_run:flaky"}]))
    Trainer(recipe, tmp_path / "run", quiet=True).run()
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert len(rows) == 3
    for row in rows:  # 4 episodes a step, calls 1..12: every third raises, the ones after a raise are NaN
        assert row["score/flaky/errors"] + row["score/flaky/nonfinite"] >= 2
        assert row["score/verifier/errors"] == 0.0 and math.isfinite(row["reward/flaky"])
    assert sum(r["score/flaky/errors"] for r in rows) == 4 and sum(r["score/flaky/nonfinite"] for r in rows) == 4


def test_two_components_of_one_name_keep_their_own_rewards():
    from outrider.pieces import build_pieces
    from outrider.registry import BuildContext

    recipe = parse_recipe(tiny_recipe(score=[{"name": "format", "pattern": "a.*"}, {"name": "format",
                                                                                   "pattern": ".*b"}]))
    components = build_pieces(recipe, BuildContext()).components
    assert [(c.name, c.where) for c in components] == [("format", "score[0]"), ("format_2", "score[1]")]


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """An installed distribution (a .dist-info on sys.path) declaring entry points in ``outrider.pieces``."""

    def install(module_source: str, value: str) -> None:
        name = f"plugmod_{abs(hash(str(tmp_path))) % 10**8}"
        (tmp_path / f"{name}.py").write_text(module_source)
        info = tmp_path / "outrider_testplugin-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: outrider-testplugin\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[outrider.pieces]\ntestplugin = {value.format(mod=name)}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(registry, "_entry_points_loaded", False)

    return install


def test_an_installed_plugin_is_loaded_when_a_recipe_names_its_piece(plugin_dist):
    plugin_dist(textwrap.dedent('''
        from outrider.score import SCORE, ComponentConfig
        @SCORE.register("plugin_constant", config=ComponentConfig)
        def constant(episodes, cfg):
            """Always 0.25."""
            return [0.25] * len(episodes)
    '''), "{mod}")
    recipe = parse_recipe(tiny_recipe(score=[{"name": "plugin_constant"}]))
    assert recipe.score[0]["name"] == "plugin_constant"
    assert "plugin_constant" in [e.name for e in SCORE.entries()]


def test_a_plugin_that_fails_to_load_is_one_line(plugin_dist):
    plugin_dist("raise ImportError('needs numpy 9')\n", "{mod}")
    with pytest.raises(OutriderError) as e:
        parse_recipe(tiny_recipe(score=[{"name": "unknown_piece_xyz"}]))
    assert "plugin 'testplugin = plugmod_" in str(e.value)
    assert "(entry point group outrider.pieces, distribution outrider-testplugin) failed to load: ImportError: " \
           "needs numpy 9" in str(e.value)


@SCORE.register("test_counting", config=ComponentConfig)
class _Counting(registry.Piece):
    """An episode-level component with metrics of its own: how many episodes it scored since the last step."""

    def __init__(self, cfg, build=None):
        super().__init__(cfg, build)
        self.seen = 0

    def __call__(self, episodes):
        self.seen += len(episodes)
        return [1.0] * len(episodes)

    def step_metrics(self):
        seen, self.seen = self.seen, 0
        if seen == 5:
            raise ZeroDivisionError("broken metric")
        return {"counting/seen": seen}


def test_episode_level_component_reports_its_own_metrics_once_per_step():
    counting = component({"name": "test_counting"})
    compose([episode("ab"), episode("abc")], [counting])  # two scoring calls in one step (dynamic sampling)
    compose([episode("a")], [counting])
    assert score_step_metrics([counting]) == {"score/test_counting/errors": 0.0,
                                              "score/test_counting/nonfinite": 0.0, "counting/seen": 3.0}
    compose([episode("a")] * 5, [counting])  # a step_metrics that raises is logged, never stops the run
    assert score_step_metrics([counting]) == {"score/test_counting/errors": 0.0,
                                              "score/test_counting/nonfinite": 0.0}
    assert "step_metrics: ZeroDivisionError" in counting.last_failure
