"""Registries of small pieces, and the one lifecycle every piece has.

Every family (`task`, `explore`, `score`, `credit`, `update.loss`, `update.entropy`, `update.terms`, `loop`) owns
one `Registry`. A recipe section ``{name: X, **options}`` resolves to ``(entry, validated options)``
(`Registry.build`, used by recipe validation), and a run turns it into a `Piece` (`Registry.create`):

- **built once** from its options and a `BuildContext` (task, policy, device, seed, its recipe path);
- **called every step** with its family's arguments (a credit piece: the batch; a score piece: the episodes);
- **stateful if it needs to be**: `state_dict` / `load_state_dict`, which every checkpoint carries for every piece
  (the trainer never names a family or a piece when it saves them), so ``--resume`` continues it exactly;
- **declaring its needs** in one typed place, the `Needs` given at registration.

A piece is a function ``fn(*args, cfg)`` (stateless: the registry wraps it in a `FunctionPiece`) or a `Piece`
subclass, constructed as ``cls(cfg, build)``. Unknown names and options fail at load time with the valid ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import sys
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from outrider.errors import OutriderError

if TYPE_CHECKING:
    from outrider.envs.base import Task
    from outrider.policy.model import Policy

F = TypeVar("F", bound=Callable[..., Any])
Level = Literal["trajectory", "step", "token"]


class Options(BaseModel):
    """Base of every recipe section's model: unknown keys are errors, not silently ignored, and a boolean is not
    a number (pydantic would take ``true`` as 1.0 for a temperature)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and any(t in (int, float) for t in (annotation, *typing.get_args(annotation))):
            raise ValueError("expected a number, not a boolean")
        return value


class PieceConfig(Options):
    """Base of every piece's options."""


class NoOptions(PieceConfig):
    """A piece without options."""


@dataclass(frozen=True)
class Needs:
    """What a piece asks of the run, and what it promises about its output, declared once where it is registered.

    The run reads these and nothing else: it computes what some piece needs, and only then.
    """

    values: bool = False  # a value head on the policy; `batch.values` filled before credit
    hidden: bool = False  # last-layer hidden states of the preparing forward in `batch.hidden` ([B, T, H])
    logits: bool = False  # the full temperature-scaled logits [B, T, V] in the learner's forward
    old_logprobs: bool = False  # π_old recomputed by a forward before the update (else the current, detached)
    ref_logprobs: bool = False  # a frozen copy of the warm-started policy and its log-probs (`batch.ref_logprobs`)
    pairs: bool = False  # a pairwise view of the batch (chosen and rejected rows of each group)
    # score pieces: called on the packed batch after the preparing forward, returning [B, T] token rewards,
    # instead of on the episodes (which is what lets a reward read hidden states or log-probs)
    packed: bool = False
    level: Level = "trajectory"  # score pieces on episodes: one float per episode, a list per turn or per token
    # a promise (losses, entropy regulators, learner terms): a row whose advantages are 0 on every action token
    # contributes exactly 0 to the loss and its gradient, and does not change what other rows contribute
    zero_at_zero_advantage: bool = False
    # a promise (losses, entropy regulators, learner terms): how the piece's loss on an optimiser step's minibatch
    # splits into the micro-batches of `update.max_tokens_per_micro_batch`. "rows": its per-token loss is row by
    # row and its scalar loss is linear in `ctx.aggregate` over the micro-batch; "pairs": its scalar loss is a mean
    # over the micro-batch's pairs (whole groups are kept together); None: it reads the whole minibatch at once (a
    # batch quantile or covariance, a state update per call) and cannot run with a token budget
    micro_batch: Literal["rows", "pairs"] | None = None

    def __or__(self, other: "Needs") -> "Needs":
        """What a set of pieces needs together (each request is or-ed; promises are not combined)."""
        return Needs(**{f: getattr(self, f) or getattr(other, f) for f in
                        ("values", "hidden", "logits", "old_logprobs", "ref_logprobs", "pairs")})


@dataclass
class BuildContext:
    """What a piece may use when it is built: the run's task, policy and device, the run's seed and the piece's
    place in the recipe (``where``, e.g. ``score[1]``). Any may be None where a piece is built outside a run.
    The policy is the one being trained: a piece that needs a model of its own (a reward model) copies it or
    builds one; it never trains the policy's parameters itself."""

    task: "Task | None" = None
    policy: "Policy | None" = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    where: str = ""
    recipe: Any = None  # the whole validated recipe, for pieces that coordinate others (a run loop)

    def generator(self) -> torch.Generator:
        """A torch generator of the piece's own, seeded from the run's seed and the piece's place in the recipe:
        a piece that draws from it (and keeps its state in `state_dict`) resumes exactly."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.where.encode()))


class Piece:
    """A piece as a run holds it. Subclasses implement ``__call__`` (with their family's arguments); stateful ones
    override `state_dict` / `load_state_dict` (tensors, numbers, lists and dicts of them: `torch.save` stores it)."""

    entry: "Entry"  # set by `Entry.create`: the piece's name and its `Needs`

    def __init__(self, cfg: PieceConfig, build: BuildContext | None = None):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def needs(self) -> Needs:
        return self.entry.needs

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FunctionPiece(Piece):
    """A stateless piece registered as a function ``fn(*args, cfg)``: calling it calls ``fn(*args, self.cfg)``."""

    def __init__(self, fn: Callable[..., Any], cfg: PieceConfig):
        super().__init__(cfg)
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args, self.cfg)


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Any  # a function fn(*args, cfg) or a Piece subclass
    config: type[PieceConfig]
    needs: Needs = Needs()

    @property
    def doc(self) -> str:
        """The first sentence of the piece's docstring (its first paragraph when no sentence ends in it)."""
        paragraph = " ".join((getattr(self.fn, "__doc__", None) or "").strip().split("\n\n")[0].split())
        end = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)(?<!\bvs)\.(\s|$)", paragraph)
        return paragraph[: end.start() + 1] if end else paragraph

    def create(self, cfg: PieceConfig, build: BuildContext | None = None) -> Piece:
        """The piece, built once from validated options."""
        if isinstance(self.fn, type) and issubclass(self.fn, Piece):
            piece = self.fn(cfg, build or BuildContext())
        else:
            piece = FunctionPiece(self.fn, cfg)
        piece.entry = self
        return piece


class Registry:
    """Name → piece, for one family."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type[PieceConfig] = NoOptions, needs: Needs = Needs()) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.family}: '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, config, needs)
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Every registered piece, installed plugins' included (listing them is what `outrider recipes` does)."""
        load_entry_point_plugins()
        return [self._entries[n] for n in self.names()]

    def get(self, name: Any, where: str | None = None) -> Entry:
        if isinstance(name, str) and name not in self._entries:
            load_entry_point_plugins()  # an installed plugin may register it
        if not isinstance(name, str) or name not in self._entries:
            raise OutriderError(
                f"{where or self.family}: unknown {self.family} {name!r}; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, section: dict[str, Any], where: str | None = None) -> tuple[Entry, PieceConfig]:
        """Resolve ``{name: ..., **options}`` to the entry and its validated options (nothing is constructed)."""
        where = where or self.family
        if not isinstance(section, dict):
            raise OutriderError(f"{where}: expected {{name: ..., options}}; valid names: {', '.join(self.names())}")
        if "name" not in section:
            raise OutriderError(f"{where}: missing 'name'; valid: {', '.join(self.names())}")
        options = {k: v for k, v in section.items() if k != "name"}
        entry = self.get(section["name"], where)
        return entry, validate_options(entry, options, where)

    def create(self, section: dict[str, Any], build: BuildContext | None = None, where: str | None = None) -> Piece:
        """The piece of a recipe section, built once (see `Piece`)."""
        where = where or self.family
        entry, cfg = self.build(section, where)
        if build is not None:
            build = BuildContext(build.task, build.policy, build.device, build.seed, where, build.recipe)
        return entry.create(cfg, build)


def validate_options(entry: Entry, options: dict[str, Any], where: str) -> PieceConfig:
    try:
        return entry.config.model_validate(options)
    except ValidationError as e:
        raise OutriderError(format_validation_error(e, where, entry.config)) from None


def nested_model(model: type[BaseModel], loc: tuple | list) -> type[BaseModel]:
    """The options model at `loc` inside `model` (``turn_cap`` of an explore config: `TurnCapConfig`), following
    fields whose type is a model or an optional one; where the path leaves the models, the last one reached."""
    for part in loc:
        field_ = model.model_fields.get(str(part))
        if field_ is None:
            break
        found = [t for t in (field_.annotation, *typing.get_args(field_.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if not found:
            break
        model = found[0]
    return model


def format_validation_error(e: ValidationError, where: str, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field_ = f"{where}.{loc}" if loc and where else loc or where
    if err["type"] in ("extra_forbidden", "extra_forbid"):
        valid = ", ".join(nested_model(model, err["loc"][:-1]).model_fields) or "(none)"
        return f"{field_}: unknown option; valid: {valid}"
    msg = err["msg"].removeprefix("Value error, ")  # a validator's own message reads as the whole message
    return f"{field_}: {msg} (got {err.get('input')!r})"


ENTRY_POINT_GROUP = "outrider.pieces"
_entry_points_loaded = False


def load_entry_point_plugins() -> None:
    """Import the installed plugins: every entry point of the group ``outrider.pieces`` (a distribution declares
    ``[project.entry-points."outrider.pieces"] my_rewards = "my_package.rewards"``); importing a module runs its
    registrations. Done once per process, the first time a recipe names a piece no registry knows, or when the
    pieces are listed. A plugin that fails to load is one line naming it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a plugin's own imports may look pieces up
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001  (the plugin's code: any failure is one line naming it)
            dist = getattr(getattr(ep, "dist", None), "name", None)
            raise OutriderError(f"plugin '{ep.name} = {ep.value}' (entry point group {ENTRY_POINT_GROUP}"
                                f"{f', distribution {dist}' if dist else ''}) failed to load: "
                                f"{type(e).__name__}: {e}") from None


def import_user_module(name: str) -> Any:
    """Import a user's module by name (a recipe's plugins, a `python` score function), the working directory
    searched too, so a file next to the recipe run works without packaging it."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    return importlib.import_module(name)


def load_object(spec: str) -> Any:
    """The object named by ``module:attribute`` (the attribute may be dotted, e.g. ``module:Class.method``);
    `ValueError` with one line saying what is wrong (the format, the import, the missing attribute)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ValueError("expected 'module:function', e.g. my_rewards:exact")
    try:
        obj = import_user_module(module_name.strip())
    except Exception as e:  # noqa: BLE001  (the user's module: any failure is theirs to read, in one line)
        raise ValueError(f"cannot import module '{module_name}' ({type(e).__name__}: {e})") from None
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def register_package(package: str, path: list[str]) -> None:
    """Import every module of a stage's package, so each registers its pieces: a new method is a new file, and no
    `__init__` lists it."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
