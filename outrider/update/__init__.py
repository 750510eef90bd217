"""update/: loss and optimiser step. Registries: `LOSSES` (policy surrogates), `ENTROPY` (entropy regulators)."""

from outrider.registry import Registry

LOSSES: Registry = Registry("update.loss")
ENTROPY: Registry = Registry("update.entropy")

from outrider.update import entropy, losses  # noqa: E402,F401  (registers the built-ins)
