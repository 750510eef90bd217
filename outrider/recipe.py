"""Recipes: one YAML file per experiment, validated by pydantic before anything runs.

Sections that name a registered piece (`task`, `explore`, `score[*]`, `credit`, `update.loss`, `update.entropy`,
`update.terms[*]`, `loop`) are ``{name: X, **options}``; the options are checked against the piece's own config
model. `plugins` lists modules imported before anything is checked, so a recipe can use pieces its own code
registers. `resolve` returns the recipe with every default filled in, which is what a run directory records.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from outrider import RECIPES_DIR
from outrider.credit import CREDIT
from outrider.envs import ENVS
from outrider.errors import OutriderError
from outrider.explore import EXPLORE
from outrider.loops import LOOPS
from outrider.observe.trackers import TensorBoardOptions, TrackerOptions, tracker_sections
from outrider.policy.adapters import LoraConfig
from outrider.policy.sft import WarmStartConfig
from outrider.registry import Options, format_validation_error, import_user_module
from outrider.score import SCORE
from outrider.update import ENTROPY, LOSSES, TERMS
from outrider.update.learner import UpdateConfig


class Strict(Options):
    """A recipe section (unknown keys and booleans given for numbers are errors)."""


class PolicyConfig(Strict):
    model: str = Field("tiny", description="'tiny' (built-in char-level Llama-style model, random init) or a path "
                                           "to any HF causal LM + tokenizer directory.")
    hidden: int = Field(128, ge=8, description="Tiny model: hidden size.")
    layers: int = Field(2, ge=1, description="Tiny model: transformer layers.")
    heads: int = Field(4, ge=1, description="Tiny model: attention heads.")
    max_positions: int = Field(512, ge=16, description="Tiny model: longest sequence.")
    chat_template: bool = Field(True, description="Wrap observations (and single-turn prompts) in the tokenizer's "
                                                  "chat template when it has one; false: plain text.")
    compile: bool = Field(False, description="torch.compile the sampler's decoding step (Llama/Qwen2/Mistral). "
                                             "The first sampling call compiles (about 10-30 s on a 2-core CPU); "
                                             "see docs/benchmarks.md for when it pays.")
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig, description="SFT before RL.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters through peft instead of every weight "
                                                      "({r, alpha, target_modules, dropout}; needs outrider[lora]); "
                                                      "null: full fine-tuning. See docs/models.md.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                                            "pass instead of keeping them (less memory, one more "
                                                            "forward per update).")

    @model_validator(mode="after")
    def _head_dim(self) -> "PolicyConfig":
        if self.model == "tiny" and (self.hidden % self.heads or (self.hidden // self.heads) % 2):
            raise ValueError(f"hidden={self.hidden} must be a multiple of heads={self.heads} with an even head "
                             "size (rotary embeddings rotate pairs), e.g. hidden 128 with heads 4")
        return self


class ObserveConfig(Strict):
    eval_every: int = Field(20, ge=0, description="Evaluate on held-out prompts every N steps (0: start and end only).")
    eval_prompts: int = Field(128, ge=1, description="Held-out prompts per evaluation.")
    eval_samples: int = Field(16, ge=1, description="Samples per held-out prompt (n of unbiased pass@k).")
    eval_temperature: float = Field(1.0, ge=0, description="Sampling temperature at evaluation.")
    pass_at: list[int] = Field(default_factory=lambda: [1, 4, 16], description="The k of each pass@k reported.")
    checkpoint_every: int = Field(50, ge=0, description="Save a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Newest step checkpoints kept on disk.")
    report_to: list[TrackerOptions] = Field(default_factory=lambda: ["tensorboard"], validate_default=True,
                                            description="Experiment trackers the metrics also go to: tensorboard, "
                                                        "wandb, mlflow, trackio; a name or {name, ...options} "
                                                        "(see the trackers table below); []: metrics.jsonl only.")
    tensorboard: bool | None = Field(None, exclude=True, description="Older recipes' switch: true adds "
                                                                     "tensorboard to report_to, false removes it.")
    diagnostics: bool = Field(True, description="Exploration diagnostics at each evaluation: token entropy "
                                                "(mean, p80, p95, forking fraction), answer diversity, effective "
                                                "rank, support change and pass@k crossover against the start.")


    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_shorthand(cls, v: object) -> object:
        return tracker_sections(v)

    @model_validator(mode="after")
    def _tensorboard_switch(self) -> "ObserveConfig":
        if self.tensorboard is not None:
            others = [t for t in self.report_to if t.name != "tensorboard"]
            tb = [t for t in self.report_to if t.name == "tensorboard"] or [TensorBoardOptions()]
            self.report_to, self.tensorboard = (tb + others if self.tensorboard else others), None
        return self


class TrainConfig(Strict):
    steps: int = Field(200, ge=0, description="RL steps.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of model init, prompts, sampling and minibatch order: "
                                                       "0 to 2^32 - 1 (numpy's seed range).")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    max_nonfinite_steps: int = Field(3, ge=1, description="Stop the run (one-line error, exit 2) after this many "
                                                          "steps in a row whose update was skipped for a NaN/inf "
                                                          "loss or gradient (update/skipped_nonfinite_steps).")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        import torch

        try:
            device = torch.device(v)
        except RuntimeError:
            raise ValueError(f"unknown device '{v}'; valid: cpu, cuda, cuda:N, mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"'{v}' asked for, but this machine has no usable CUDA device; use cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"'{v}' asked for, but MPS is not available here; use cpu")
        return v


class Recipe(Strict):
    plugins: list[str] = Field(default_factory=list, description="Python modules to import first (e.g. my_pieces), "
                                                                 "so the recipe can name pieces they register; "
                                                                 "importable names, or files in the working "
                                                                 "directory.")
    task: dict[str, Any] = Field(..., description="The task: {name: reasoning_gym|jsonl, ...options}.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The model and its warm start.")
    explore: dict[str, Any] = Field(default_factory=lambda: {"name": "group"},
                                    description="Exploration strategy: {name: group|dynamic, ...sampling options}.")
    score: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "verifier", "weight": 1.0}],
                                        description="Reward components: [{name, weight, ...options}].")
    credit: dict[str, Any] = Field(default_factory=lambda: {"name": "grpo"}, description="Advantage estimator.")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="Loss, KL, entropy and optimiser.")
    observe: ObserveConfig = Field(default_factory=ObserveConfig, description="Evaluation, logging, checkpoints.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Steps, seed, device.")
    loop: dict[str, Any] = Field(default_factory=lambda: {"name": "rl"},
                                 description="What one step is: {name: rl|pairs, ...options} (rl: sample, score, "
                                             "credit, update; pairs: learner terms on stored pairs, no sampling).")

    @field_validator("explore", "credit", "loop", mode="before")
    @classmethod
    def _name_shorthand(cls, v: object) -> object:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _pieces_exist(self) -> "Recipe":
        ENVS.build(self.task, "task")
        EXPLORE.build(self.explore, "explore")
        CREDIT.build(self.credit, "credit")
        LOSSES.build(self.update.loss, "update.loss")
        ENTROPY.build(self.update.entropy, "update.entropy")
        for i, term in enumerate(self.update.terms):
            TERMS.build(term, f"update.terms[{i}]")
        LOOPS.build(self.loop, "loop")
        for i, comp in enumerate(self.score):
            SCORE.build({k: v for k, v in comp.items() if k != "weight"}, f"score[{i}]")
            weight = comp.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise OutriderError(f"score[{i}].weight: must be a finite number (got {weight!r})")
        if not self.score:
            raise OutriderError("score: at least one reward component is needed; valid: " + ", ".join(SCORE.names()))
        if not self.observe.pass_at or min(self.observe.pass_at) < 1:
            raise OutriderError(f"observe.pass_at: needs at least one k, each k >= 1 (got {self.observe.pass_at})")
        if max(self.observe.pass_at) > self.observe.eval_samples:
            raise OutriderError(f"observe.pass_at: k={max(self.observe.pass_at)} exceeds observe.eval_samples="
                                f"{self.observe.eval_samples}")
        return self


class _RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe reads it: ``1e-4`` (an exponent without a dot, a string in YAML 1.1) is a number; only
    true/false are booleans (YAML 1.1 also reads yes/no/on/off/y/n as booleans, which then pass as numbers:
    ``temperature: yes`` was 1.0); a key given twice in one mapping is an error, not silently the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice in one mapping (lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not isinstance(node, (dict, list)):
            raise OutriderError(f"--set {dotted}: '{'.'.join(parts[:i])}' is {node!r}, which has no '{part}'")
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise OutriderError(f"--set {dotted}: '{part}' is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
        else:
            if isinstance(node.get(part), str):  # a name shorthand being given options
                node[part] = {"name": node[part]}
            node = node.setdefault(part, {})


def _piece_defaults() -> dict[str, str]:
    """Dotted section -> the name of the piece used when a recipe leaves the section out."""
    return {"explore": Recipe.model_fields["explore"].default_factory()["name"],
            "credit": Recipe.model_fields["credit"].default_factory()["name"],
            "update.loss": UpdateConfig.model_fields["loss"].default_factory()["name"],
            "update.entropy": UpdateConfig.model_fields["entropy"].default_factory()["name"],
            "loop": Recipe.model_fields["loop"].default_factory()["name"]}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides. Values are parsed as YAML (``1e-4``, ``true``, ``[1, 2]``, ``{a: 1}``);
    text that is not valid YAML stays text, and so does a braced value without a colon (``{question}``, a
    template); quote a value to force text (``--set 'task.template="{question} ="'``)."""
    if not isinstance(data, dict):
        return data  # not a recipe at all: parse_recipe says so
    for item in overrides:
        if "=" not in item:
            raise OutriderError(f"--set '{item}': expected KEY.PATH=VALUE, e.g. update.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and ":" not in raw:  # `{question}`: a template, not a YAML mapping of nulls
            value = raw
        for section, default in _piece_defaults().items():
            if key.strip().startswith(section + "."):  # options of a piece the recipe leaves at its default
                *parents, leaf = section.split(".")
                node: Any = data
                for part in parents:
                    node = node.setdefault(part, {}) if isinstance(node, dict) else None
                if isinstance(node, dict) and leaf not in node:
                    node[leaf] = {"name": default}
        _set_dotted(data, key.strip(), value)
    return data


def import_plugins(modules: Any) -> None:
    """Import the recipe's `plugins` (their registrations run on import); the working directory is searched too."""
    if not modules:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise OutriderError(f"plugins: expected a list of module names (got {modules!r})")
    for name in modules:
        try:
            import_user_module(name)
        except Exception as e:  # noqa: BLE001  (the user's module: any failure is theirs to read, in one line)
            raise OutriderError(f"plugins: cannot import '{name}' ({type(e).__name__}: {e})") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise OutriderError(f"{source}: expected a mapping of sections (task, policy, explore, ...)")
    import_plugins(data.get("plugins"))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise OutriderError(f"{source}: " + _recipe_error(e)) from None


def _recipe_error(e: ValidationError) -> str:
    return format_validation_error(e, "", Recipe)


def shipped_recipes() -> list[Path]:
    """The recipes that come with the package, by name."""
    return sorted(RECIPES_DIR.glob("*.yaml"))


def find_recipe(path: str | Path) -> Path:
    """A recipe file: `path` itself, or a shipped recipe named by its name (``quickstart`` or
    ``quickstart.yaml``) when no such file exists."""
    p = Path(path)
    shipped = RECIPES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if not p.is_file() and p.parent == Path(".") and shipped.is_file():
        return shipped
    if not p.is_file():
        names = ", ".join(r.stem for r in shipped_recipes())
        raise OutriderError(f"recipe: no such file '{path}' (shipped recipes, by name: {names})")
    return p


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    p = find_recipe(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OutriderError(f"{path}: not a YAML text file (not UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise OutriderError(f"recipe: cannot read '{path}' ({e.strerror or e})") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise OutriderError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_recipe(apply_overrides(data or {}, overrides or []), str(path))


def resolve(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every piece's defaults filled in (what `recipe.yaml` of a run records)."""
    out = recipe.model_dump(mode="json")

    def piece(registry, section: dict[str, Any], where: str) -> dict[str, Any]:
        entry, cfg = registry.build(section, where)
        return {"name": entry.name, **cfg.model_dump(mode="json")}

    out["task"] = piece(ENVS, recipe.task, "task")
    out["explore"] = piece(EXPLORE, recipe.explore, "explore")
    out["credit"] = piece(CREDIT, recipe.credit, "credit")
    out["update"]["loss"] = piece(LOSSES, recipe.update.loss, "update.loss")
    out["update"]["entropy"] = piece(ENTROPY, recipe.update.entropy, "update.entropy")
    out["update"]["terms"] = [piece(TERMS, t, f"update.terms[{i}]") for i, t in enumerate(recipe.update.terms)]
    out["loop"] = piece(LOOPS, recipe.loop, "loop")
    out["score"] = [{**piece(SCORE, {k: v for k, v in c.items() if k != "weight"}, f"score[{i}]"),
                     "weight": float(c.get("weight", 1.0))} for i, c in enumerate(recipe.score)]
    return out
