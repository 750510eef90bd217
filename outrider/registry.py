"""Registries of small pieces: a name maps to a callable (or class) plus the pydantic model of its options.

Every family (`envs`, `explore`, `score`, `credit`, `update.loss`, `update.entropy`) owns one `Registry`. A recipe
section ``{name: X, **options}`` resolves to ``(piece, validated options)``; unknown names and options fail at
load time with the list of valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from outrider.errors import OutriderError

F = TypeVar("F", bound=Callable[..., Any])


class PieceConfig(BaseModel):
    """Base of every piece's options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(PieceConfig):
    """A piece without options."""


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Any
    config: type[PieceConfig]
    # properties a caller may rely on, declared where the piece is registered (see each family's docs)
    traits: frozenset[str] = frozenset()

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


class Registry(Generic[F]):
    """Name → piece, for one family."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type[PieceConfig] = NoOptions,
                 traits: frozenset[str] | set[str] = frozenset()) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.family}: '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, config, frozenset(traits))
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._entries:
            raise OutriderError(
                f"{where or self.family}: unknown {self.family} '{name}'; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, section: dict[str, Any], where: str | None = None) -> tuple[Entry, PieceConfig]:
        """Resolve ``{name: ..., **options}`` to the entry and its validated options."""
        where = where or self.family
        if "name" not in section:
            raise OutriderError(f"{where}: missing 'name'; valid: {', '.join(self.names())}")
        options = {k: v for k, v in section.items() if k != "name"}
        entry = self.get(section["name"], where)
        return entry, validate_options(entry, options, where)


def validate_options(entry: Entry, options: dict[str, Any], where: str) -> PieceConfig:
    try:
        return entry.config.model_validate(options)
    except ValidationError as e:
        raise OutriderError(format_validation_error(e, where, entry.config)) from None


def format_validation_error(e: ValidationError, where: str, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    field = f"{where}.{loc}" if loc else where
    if err["type"] == "extra_forbidden":
        valid = ", ".join(model.model_fields) or "(none)"
        return f"{field}: unknown option; valid: {valid}"
    return f"{field}: {err['msg']} (got {err.get('input')!r})"
