"""A run's pieces, built from a recipe: every section that names a registered piece becomes a `Piece`, keyed by
its place in the recipe (``explore``, ``score[1]``, ``credit``, ``update.loss``, ``update.entropy``,
``update.terms[0]``, ``loop``). Checkpoints carry every piece's `state_dict` under that key, so the trainer saves
and restores them without knowing what they are.

What the run must compute (a value head, hidden states, old or reference log-probs, pairwise minibatches) is the
union of the pieces' `Needs`, known from their registrations before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outrider.credit import CREDIT
from outrider.explore import EXPLORE
from outrider.loops import LOOPS
from outrider.registry import BuildContext, Needs, Piece
from outrider.score import SCORE, Component
from outrider.update import ENTROPY, LOSSES, TERMS
from outrider.update.terms import build_terms

if TYPE_CHECKING:
    from outrider.recipe import Recipe


def _score_section(component: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in component.items() if k != "weight"}


def _kl_reward(recipe: "Recipe") -> dict[str, Any] | None:
    """``update.kl`` with ``placement: reward`` is the packed score component `kl_penalty` of weight β."""
    kl = recipe.update.kl
    return {"name": "kl_penalty", "estimator": kl.estimator} if kl.coef > 0 and kl.placement == "reward" else None


def recipe_needs(recipe: "Recipe") -> Needs:
    """What the recipe's pieces need together (from their registrations; nothing is built)."""
    u = recipe.update
    entries = [EXPLORE.build(recipe.explore, "explore")[0], CREDIT.build(recipe.credit, "credit")[0],
               LOSSES.build(u.loss, "update.loss")[0], ENTROPY.build(u.entropy, "update.entropy")[0],
               LOOPS.build(recipe.loop, "loop")[0]]
    entries += [SCORE.build(_score_section(c), f"score[{i}]")[0] for i, c in enumerate(recipe.score)]
    entries += [TERMS.build(t, f"update.terms[{i}]")[0] for i, t in enumerate(u.terms)]
    if (section := _kl_reward(recipe)) is not None:
        entries.append(SCORE.build(section, "update.kl")[0])
    needs = Needs()
    for entry in entries:
        needs = needs | entry.needs
    if u.kl.coef > 0:
        needs = needs | Needs(ref_logprobs=True)
    return needs


@dataclass
class Pieces:
    """The built pieces of one run (see the module docstring)."""

    explore: Piece
    components: list[Component]
    credit: Piece
    loss: Piece
    regulator: Piece
    terms: list[Piece]  # the learner's, in summation order (built-in ones wrap `loss` and `regulator`)
    loop: Piece
    needs: Needs
    named: dict[str, Piece] = field(default_factory=dict)  # recipe path -> piece: what checkpoints carry

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every piece's non-empty state, by its place in the recipe."""
        return {where: state for where, piece in self.named.items() if (state := piece.state_dict())}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for where, state in states.items():
            if where in self.named:
                self.named[where].load_state_dict(state)


def build_pieces(recipe: "Recipe", build: BuildContext) -> Pieces:
    """Build every piece of the recipe once, for a run with the given task, policy, device and seed."""
    u = recipe.update
    needs = recipe_needs(recipe)
    build = BuildContext(build.task, build.policy, build.device, build.seed, build.where, recipe)
    named: dict[str, Piece] = {}

    def create(registry: Any, section: dict[str, Any], where: str) -> Piece:
        named[where] = registry.create(section, build, where)
        return named[where]

    components: list[Component] = []

    def component(piece: Piece, weight: float, where: str) -> Component:
        # two components of one name (two `format` patterns, two `python` functions of one name) keep their own
        # rewards and metrics: the second is <name>_2
        taken = {c.name for c in components}
        name = next(n for n in (piece.name, *(f"{piece.name}_{k}" for k in range(2, 99))) if n not in taken)
        return Component(name, piece, weight, where)

    for i, c in enumerate(recipe.score):
        piece = create(SCORE, _score_section(c), f"score[{i}]")
        components.append(component(piece, float(c.get("weight", 1.0)), f"score[{i}]"))
    if (section := _kl_reward(recipe)) is not None:
        components.append(component(create(SCORE, section, "update.kl"), u.kl.coef, "update.kl"))
    explore = create(EXPLORE, recipe.explore, "explore")
    credit = create(CREDIT, recipe.credit, "credit")
    loss = create(LOSSES, u.loss, "update.loss")
    regulator = create(ENTROPY, u.entropy, "update.entropy")
    extra = [create(TERMS, t, f"update.terms[{i}]") for i, t in enumerate(u.terms)]
    terms = build_terms(u, loss, regulator, values=needs.values, reference=needs.ref_logprobs, extra=extra)
    loop = create(LOOPS, recipe.loop, "loop")
    return Pieces(explore, components, credit, loss, regulator, terms, loop, needs, named)
