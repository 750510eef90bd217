"""Go-Explore [19]: the archive's selection weights and insert/replace rules on hand-computed cases (empty archive,
one cell, ties), the piece's step on a scripted corridor (returns by restore, solutions, the backward algorithm,
imitation rows, metrics), bad options as one-line errors, and the archive surviving kill -9 + --resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import write_recipe
from outrider.data import Episode, GroupIds, Turn
from outrider.errors import OutriderError
from outrider.explore import ExploreContext
from outrider.explore.archive import Archive, Cell, CountWeight, SelectionConfig, better, cell_function
from outrider.explore.go_explore import GoExplore, GoExploreConfig
from outrider.registry import BuildContext


def cell(seed=0, depth=0, ret=0.0, events=(), **counts) -> Cell:
    return Cell(seed, [Turn("o", [], "a") for _ in range(depth)], None, ret, tuple(events), **counts)


def episode(keys, rewards=None, seed=0, success=False, events=None) -> Episode:
    """An episode whose turn k starts at state keys[k] (snapshot 'snap-<key>')."""
    rewards = rewards or [0.0] * len(keys)
    turns = [Turn(f"obs {k}", [], "r", reward=r, snapshot=f"snap-{k}", info={"state_key": k})
             for k, r in zip(keys, rewards)]
    for k, ev in (events or {}).items():
        turns[k].info["events"] = ev
    return Episode(group_id=0, seed=seed, turns=turns, done=success, success=success)


# --- selection weights ------------------------------------------------------------------------------------------
def test_weight_is_one_over_root_seen_plus_one_by_default() -> None:
    cfg = SelectionConfig(floor=0.0)
    assert [cell(seen=n).weight(cfg) for n in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    assert cell(seen=3).weight(SelectionConfig()) == pytest.approx(0.5 + 1e-5, abs=1e-12)


def test_weight_sums_the_counts_options() -> None:
    cfg = SelectionConfig(seen=CountWeight(weight=1.0, power=0.5), chosen=CountWeight(weight=2.0, power=1.0),
                          chosen_since_new=CountWeight(weight=0.5, power=0.0), floor=0.0)
    # 1/sqrt(4) + 2/(1+1) + 0.5/1
    assert cell(seen=3, chosen=1, chosen_since_new=7).weight(cfg) == pytest.approx(0.5 + 1.0 + 0.5)


def test_probabilities_hand_computed_with_the_level_weight() -> None:
    a = Archive(lambda k: k)
    a.cells = {(0, "s"): cell(seen=0), (0, "t"): cell(seen=3), (0, "u"): cell(seen=0, events=("key", "door")),
               (1, "v"): cell(seed=1, seen=8)}
    keys, p = a.probabilities(SelectionConfig(floor=0.0))
    assert keys == [(0, "s"), (0, "t"), (0, "u"), (1, "v")]
    np.testing.assert_allclose(p, np.array([1, 0.5, 1, 1 / 3]) / (2.5 + 1 / 3))
    # layout 0's top level is 2: its level-0 cells weigh 0.1**2 as much; layout 1 has one level (0)
    _, p = a.probabilities(SelectionConfig(floor=0.0, low_level_weight=0.1))
    np.testing.assert_allclose(p, np.array([0.01, 0.005, 1, 1 / 3]) / (1.015 + 1 / 3))


def test_choose_degenerate_cases() -> None:
    rng, cfg = np.random.default_rng(0), SelectionConfig()
    empty = Archive(lambda k: k)
    assert empty.choose(3, rng, cfg) == [] and empty.probabilities(cfg)[0] == []
    one = Archive(lambda k: k, cells={(0, "s"): cell()})
    assert one.choose(3, rng, cfg) == [(0, "s")] * 3  # more draws than cells: with replacement
    assert (one.cells[(0, "s")].chosen, one.cells[(0, "s")].chosen_since_new) == (3, 3)
    assert one.choose(0, rng, cfg) == []
    two = Archive(lambda k: k, cells={(0, "s"): cell(), (0, "t"): cell()})
    assert sorted(two.choose(2, rng, cfg)) == [(0, "s"), (0, "t")]  # enough cells: without replacement
    zero = SelectionConfig(seen=CountWeight(weight=0.0), floor=0.0)  # every weight 0: uniform, not a crash
    np.testing.assert_allclose(two.probabilities(zero)[1], [0.5, 0.5])
    two.found_new((0, "s"))
    assert two.cells[(0, "s")].chosen_since_new == 0 and two.cells[(0, "s")].chosen == 1


def test_choose_draws_by_weight() -> None:
    a = Archive(lambda k: k, cells={(0, "s"): cell(seen=0), (0, "t"): cell(seen=15)})  # weights 1 and 1/4
    rng, cfg = np.random.default_rng(1), SelectionConfig(floor=0.0)
    draws = [a.choose(1, rng, cfg)[0] for _ in range(4000)]
    assert draws.count((0, "s")) / 4000 == pytest.approx(0.8, abs=0.02)


# --- insert / replace -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep, new, old, expected", [
    ("return", (1.0, 9), (0.0, 3), True),    # higher return wins, however long
    ("return", (0.0, 2), (0.0, 3), True),    # equal return: shorter wins
    ("return", (0.0, 3), (0.0, 3), False),   # exact tie: the archived one stays
    ("return", (0.0, 2), (1.0, 9), False),
    ("shortest", (0.0, 2), (1.0, 3), True),  # shorter wins, whatever the return
    ("shortest", (1.0, 3), (0.0, 3), True),  # equal length: higher return wins
    ("shortest", (1.0, 3), (1.0, 3), False),
    ("shortest", (9.0, 4), (0.0, 3), False),
])
def test_better(keep, new, old, expected) -> None:
    assert better(*new, *old, keep) is expected


def test_add_new_cells_replacements_and_seen_counts() -> None:
    a = Archive(lambda k: k)
    up = a.add(episode(["A", "B", "C", "B"]), given=0)
    assert (up.new, up.improved, up.solved) == (3, 0, False)
    assert {k: (c.depth, c.seen, c.snapshot) for k, c in a.cells.items()} == {
        (0, "A"): (0, 1, None), (0, "B"): (1, 1, "snap-B"), (0, "C"): (2, 1, "snap-C")}  # B seen once per episode
    assert [t.snapshot for t in a.cells[(0, "C")].turns] == [None, None]  # cells keep one snapshot, not one a turn
    # C reached in one turn (shorter, same return): replaces; its chosen counts start over, seen carries on
    a.cells[(0, "C")].chosen = 4
    up = a.add(episode(["A", "C"]), given=0)
    assert (up.new, up.improved) == (0, 1)
    c = a.cells[(0, "C")]
    assert (c.depth, c.seen, c.chosen, c.text) == (1, 2, 0, "obs C")
    # a longer path with a higher return replaces too (keep: return); a prefix's turns are not archived again
    up = a.add(episode(["A", "B", "D", "C"], rewards=[0, 0.5, 0, 0]), given=2)
    assert (up.new, up.improved) == (1, 1) and a.cells[(0, "C")].ret == 0.5 and a.cells[(0, "D")].ret == 0.5
    assert a.cells[(0, "B")].seen == 1 and a.best_return == 0.5


def test_add_keeps_chosen_counts_without_reset_and_other_layouts_apart() -> None:
    a = Archive(lambda k: k, reset_on_update=False)
    a.add(episode(["A", "B", "C"]), 0)
    a.cells[(0, "C")].chosen = 4
    a.add(episode(["A", "C"]), 0)
    assert a.cells[(0, "C")].chosen == 4
    a.add(episode(["A", "C"], seed=1), 0)  # the same state of another layout is another cell
    assert (1, "C") in a.cells and len(a.cells) == 5


def test_solutions_keep_the_better_success_and_events_are_counted() -> None:
    a = Archive(lambda k: k)
    assert a.add(episode(["A", "B", "C"], rewards=[0, 0, 1], success=True, events={1: ["key"]}), 0).solved
    assert a.solutions[0].depth == 3 and a.best_events == 1
    assert not a.add(episode(["A", "B", "C", "D"], rewards=[0, 0, 0, 1], success=True), 0).solved  # longer: no
    assert a.add(episode(["A", "C"], rewards=[0, 1], success=True), 0).solved
    assert a.solutions[0].depth == 2 and a.cells[(0, "C")].events == ()


def test_add_with_a_judge_that_refuses() -> None:
    a = Archive(lambda k: k)
    up = a.add(episode(["A", "B", "C"]), 0, accept=lambda c: c.depth != 1)
    assert up.new == 2 and set(a.cells) == {(0, "A"), (0, "C")}


def test_coarse_cells_and_state_round_trip() -> None:
    a = Archive(lambda k: k[0])  # cells by the key's first char: B1 and B2 are one cell
    a.add(episode(["A0", "B1", "B2", "C0"]), 0)
    assert list(a.cells) == [(0, "A"), (0, "B"), (0, "C")] and a.cells[(0, "B")].depth == 1
    b = Archive(lambda k: k[0])
    b.load_state_dict(a.state_dict())
    assert list(b.cells) == list(a.cells) and b.cells[(0, "C")].turns[1].action == "r"


def test_unknown_cell_function_is_one_line() -> None:
    class T:
        cell_functions = {"position": lambda k: k}

    assert cell_function("position", T())("x") == "x" and cell_function("state_key", None)("y") == "y"
    with pytest.raises(OutriderError, match=r"^explore.cell: unknown cell function 'room'; valid: position, "
                                            r"state_key$"):
        cell_function("room", T())


# --- the piece on a scripted corridor ---------------------------------------------------------------------------
LENGTH, HORIZON = 5, 7  # a walk from 0 must reach 5 within 7 turns ('r' +1, 'l' -1, floor 0)


class Corridor:
    def reset(self, seed: int) -> str:
        self.pos = 0
        return "at 0"

    def state_key(self) -> int:
        return self.pos

    def snapshot(self) -> int:
        return self.pos

    def restore(self, pos: int) -> str:
        self.pos = pos
        return f"at {pos}"


class CorridorTask:
    def make_env(self, split: str) -> Corridor:
        return Corridor()


def corridor_ctx(rng_seed: int, step: int = 1) -> ExploreContext:
    """A context whose 'policy' walks right with probability 0.6; prefixes are replayed or restored."""
    walker = np.random.default_rng(rng_seed + 1000)

    def rollout(starts, snapshots=False):
        out = []
        for s in starts:
            pos = s.snapshot if s.snapshot is not None else sum(1 if t.action == "r" else -1 for t in s.prefix)
            turns, done = [Turn(t.observation, [], t.action, reward=t.reward, info=dict(t.info)) for t in s.prefix], False
            start_pos = pos
            while len(turns) < HORIZON and not done:
                a = "r" if walker.random() < 0.6 else "l"
                turn = Turn(f"at {pos}", [], a, info={"state_key": pos}, snapshot=pos if snapshots else None)
                pos = max(pos + (1 if a == "r" else -1), 0)
                done = pos == LENGTH
                turn.reward = float(done)
                turns.append(turn)
            out.append(Episode(group_id=s.group_id, seed=s.seed, turns=turns, origin=s.origin, done=done,
                               success=done, metadata={"start_pos": start_pos}))
        return out

    return ExploreContext(rollout=rollout, score=lambda eps: None, next_seeds=lambda n: list(range(100, 100 + n)),
                          groups=GroupIds(), rng=np.random.default_rng([rng_seed, step]), step=step)


def piece(**options) -> GoExplore:
    cfg = GoExploreConfig(**{"prompts_per_step": 4, "group_size": 4, "layouts": 2, **options})
    return GoExplore(cfg, BuildContext(task=CorridorTask()))


def test_go_explore_returns_to_cells_and_solves_by_backward_steps() -> None:
    ge = piece(robustify={"method": "backward", "groups": 1, "threshold": 0.25})
    episodes, m = ge(corridor_ctx(0))
    assert ge.pool == [100, 101] and len(episodes) == 16
    assert m["explore/restart_share"] == 0.0 and m["explore/archive_cells"] == len(ge.archive.cells) > 2
    assert m["explore/new_cells"] == len(ge.archive.cells) - 2  # both start cells were there before the step
    seen_restart = False
    for step in range(2, 30):
        episodes, m = ge(corridor_ctx(0, step))
        restarted = [e for e in episodes if e.origin == "restart"]
        seen_restart |= bool(restarted)
        for e in restarted:  # a return keeps the cell's trajectory as its prefix
            assert any(len(c.turns) and [t.action for t in c.turns] == [t.action for t in e.turns[:c.depth]]
                       for c in ge.archive.cells.values())
        if m.get("explore/backward_at_start") == 1.0:
            break
    assert seen_restart and m["explore/solved_layouts"] >= 1
    assert m["explore/backward_at_start"] == 1.0  # the backward pointers walked back to the start states
    assert m["explore/start_success"] > 0


def test_backward_pointer_moves_only_when_the_group_succeeds_enough() -> None:
    ge = piece(robustify={"method": "backward", "groups": 1, "threshold": 0.5, "step_back": 2})
    ge.pointers = {7: 5, 8: 1}
    ok = [Episode(0, 7, success=s) for s in (True, True, False, False)]
    ge._move_pointers(ok + [Episode(0, 8, success=True)] * 4, [7, 8], [5, 1])
    assert ge.pointers == {7: 3, 8: 0}  # 2/4 >= 0.5: back 2; never before the start
    ge._move_pointers([Episode(0, 7, success=s) for s in (True, False, False, False)], [7], [3])
    assert ge.pointers[7] == 3
    ge._move_pointers([Episode(0, 7, success=True)] * 4, [7], [4])
    assert ge.pointers[7] == 3  # a group started later than the pointer (later_share) never moves it


def test_later_share_draws_starts_between_the_pointer_and_the_last_turn() -> None:
    ge = piece(robustify={"method": "backward", "groups": 1, "later_share": 0.5})
    ge.archive.solutions[100] = Cell(100, [Turn(f"at {k}", [], "r") for k in range(6)], None, 1.0)
    ge.pointers = {100: 2}
    ctx = corridor_ctx(0)
    turns = [ge._backward_turn(ctx, 100) for _ in range(4000)]
    at_pointer = sum(t == 2 for t in turns) / len(turns)
    assert set(turns) == {2, 3, 4, 5}  # never before p, never the solution's end (turn 6)
    assert abs(at_pointer - (0.5 + 0.5 / 4)) < 0.03  # 1 − share, plus the uniform draw's share of p itself
    ge0 = piece(robustify={"method": "backward", "groups": 1})
    ge0.archive.solutions, ge0.pointers = ge.archive.solutions, {100: 2}
    before = ctx.rng.bit_generator.state
    assert ge0._backward_turn(ctx, 100) == 2 and ctx.rng.bit_generator.state == before  # share 0: no draw


def test_backward_with_imitate_adds_the_solutions_as_chosen_rows() -> None:
    ge = piece(robustify={"method": "backward", "groups": 1, "imitate": True, "demos_per_step": 8})
    ge.archive.solutions[100] = Cell(100, [Turn(f"at {k}", [], "r") for k in range(3)], None, 1.0)
    episodes, m = ge(corridor_ctx(3))
    assert m["explore/demos"] == 1 == sum(e.preference == "chosen" for e in episodes) and len(episodes) == 17


def test_imitation_adds_the_solutions_as_chosen_rows() -> None:
    ge = piece(robustify={"method": "imitation", "demos_per_step": 8})
    ge.archive.solutions[100] = Cell(100, [Turn(f"at {k}", [], "r") for k in range(3)], None, 1.0)
    episodes, m = ge(corridor_ctx(3))
    demos = [e for e in episodes if e.preference == "chosen"]
    assert m["explore/demos"] == 1 == len(demos) and len(episodes) == 17
    d = demos[0]
    assert (d.origin, d.off_policy, d.success, d.seed, len(d.turns)) == ("replay", True, True, 100, 3)
    assert d.turns[0] is not ge.archive.solutions[100].turns[0]  # the archive's turns are not handed out
    assert all(e.group_id != d.group_id for e in episodes if e is not d)


def test_bad_options_are_one_line() -> None:
    class NoRestore:
        def reset(self, seed):
            return ""

        def state_key(self):
            return 0

    class Task:
        def make_env(self, split):
            return NoRestore()

    with pytest.raises(OutriderError, match=r"^task.name: go_explore .*\(NoRestore\) has no snapshot\(\) / restore\(\)"):
        GoExplore(GoExploreConfig(), BuildContext(task=Task()))
    with pytest.raises(OutriderError, match=r"^explore.cell: unknown cell function 'room'"):
        GoExplore(GoExploreConfig(cell="room"), BuildContext(task=CorridorTask()))
    no_nll = SimpleNamespace(update=SimpleNamespace(terms=[{"name": "dpo"}]))
    with pytest.raises(OutriderError, match=r"^explore.robustify.method: imitation marks solutions preference=chosen"):
        GoExplore(GoExploreConfig(robustify={"method": "imitation"}), BuildContext(task=CorridorTask(), recipe=no_nll))
    with pytest.raises(OutriderError, match=r"^explore.robustify.imitate: true marks solutions .* add update.terms"):
        GoExplore(GoExploreConfig(robustify={"method": "backward", "imitate": True}),
                  BuildContext(task=CorridorTask(), recipe=no_nll))
    with pytest.raises(ValueError, match="imitate adds imitation rows to method backward; with method none"):
        GoExploreConfig(robustify={"imitate": True})
    with pytest.raises(ValueError, match="exceed prompts_per_step"):
        GoExploreConfig(prompts_per_step=2, start_groups=1, robustify={"method": "backward", "groups": 2})


# --- the archive rides in checkpoints ---------------------------------------------------------------------------
def go_explore_recipe(directory) -> "Path":
    from test_resume import RESUME_OVERRIDES

    recipe = write_recipe(directory, **{k: v for k, v in RESUME_OVERRIDES.items() if k != "score"})
    import yaml

    r = yaml.safe_load(recipe.read_text())
    r["task"] = {"name": "bandit", "arms": 3, "pulls": 6, "eval_size": 16}
    r["policy"]["max_positions"] = 128
    r["score"] = [{"name": "verifier", "weight": 1.0}]
    r["explore"] = {"name": "go_explore", "prompts_per_step": 3, "group_size": 2, "max_new_tokens": 2, "layouts": 3,
                    "start_groups": 1, "robustify": {"method": "backward", "groups": 1}}
    recipe.write_text(yaml.safe_dump(r, sort_keys=False))
    return recipe


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from outrider.recipe import load_recipe
    from outrider.trainer import Trainer

    root = tmp_path_factory.mktemp("go_explore")
    Trainer(load_recipe(go_explore_recipe(root)), root / "A", quiet=True).run()
    return root / "A"


def test_archive_is_in_every_checkpoint(reference) -> None:
    import torch

    from conftest import read_jsonl
    from outrider.checkpoint import STATE_FILE, list_checkpoints

    state = torch.load(list_checkpoints(reference)[-1] / STATE_FILE, weights_only=False)["pieces"]["explore"]
    assert set(state) == {"archive", "pool", "pointers"} and len(state["pool"]) == 3
    assert len(state["archive"]["cells"]) > 10 and state["archive"]["solutions"] and state["pointers"]
    rows = read_jsonl(reference / "metrics.jsonl")
    assert max(r.get("explore/restart_share", 0) for r in rows) > 0


@pytest.mark.slow  # two real processes, ~30 s
def test_killed_go_explore_run_resumes_to_identical_metrics(reference, tmp_path) -> None:
    from test_resume import killed_run_resumes_like

    killed_run_resumes_like(reference, go_explore_recipe(tmp_path), tmp_path)
