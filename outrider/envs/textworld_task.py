"""TextWorld games as a multi-turn task: Coin Collector and Treasure Hunter [TextWorld: Côté et al. 2018,
"TextWorld: A Learning Environment for Text-based Games"; Coin Collector: Yuan et al. 2018].

Games. Each split has a pool of games (``train_games`` / ``eval_games``); an env seed picks game
``seed % pool``. Every game has its own generator seed, derived from (challenge, level, split, index, seed), so
train and eval games are different games (at very low levels two games can still share a layout: level 1 of Coin
Collector is one room with a coin). Games are generated at first use with TextWorld's Python API (the
``tw-make`` challenges), into ``cache_dir``; generation writes into a temporary folder and renames the files into
place (the ``.json`` first, the ``.z8`` last, and a game counts as present only when both exist), so a run killed
mid-generation leaves no broken game and concurrent runs may share one cache. Generation costs about 1.2 s per
game on the dev CPU (2 s for the first one in a process, which loads TextWorld's grammar); starting a game
interpreter costs ~0.1 s and resetting one ~0.01 s, so started interpreters are pooled per game file and re-used.
Each interpreter (jericho's frotz, a C library) runs in a forked child process (`envs/child.py`), not in-process:
a call that never returns (the env time limit, `task.step_timeout_s`) can then be ended by killing the child, and
its output goes to /dev/null; the pipe adds ~0.6 ms per step. A handle whose call did not finish is killed, never
pooled again.

Observations. ``format: verbose`` is the game's own text (banner and status line removed). ``format: compact``
is a short line built from what the game reports, for a char-level model with a 512-token context::

    Spare Room. exits: east north. here: coin.
    >

room name (from the ``-= Room =-`` header), exits (the ``go ...`` admissible commands), objects that can be taken
and, after an action that did not lead to a room, the first sentence of the game's answer. The objective is
shown in the first observation for Treasure Hunter (it names the object to find); for Coin Collector it is
hidden by default, since at levels 1-100 it spells out the route: the agent has to explore (its maps are chains
started from one end, so "take the exit you did not come from" solves them).

Rewards: the score delta of each step (Coin Collector and Treasure Hunter score 0 or 1); ``success`` is the game's
``won``. An action that is not in the admissible commands is still sent (TextWorld answers with its own text,
e.g. "You can't see any such thing.") and marked ``invalid``, except Inform's out-of-world (meta) commands
(``META_VERBS``: quit, restart, save, restore, undo, score, transcript, verbose/brief, notify, again, ...): they
are not sent (quit/restart would leave the game waiting for a yes/no answer and take the next command as it,
save writes a file, verbose/brief/notify change later texts), and neither is a command starting with a backslash
(dumb-frotz reads such a line as its own command, and on one it does not know, e.g. backslash-zz, it loops
forever printing "unknown command"); the step is marked ``invalid``, the observation is an error line (plus, in compact format, the room
line), and the episode goes on unchanged.

Demonstrations are the walkthroughs (``policy_commands``) replayed through the env; one that does not win, or is
longer than ``max_turns``, raises an OutriderError (it is not cut: a cut walkthrough would teach a loss).

``snapshot()`` returns the (seed, command history) and ``restore`` replays it from a reset: a Z-machine state
alone (jericho's get_state) would not restore TextWorld's own quest tracking, and episodes are short, so replay
is cheap (~3 ms per command) and exact. The history holds every command stepped, refused meta-commands included:
replaying refuses them again, so the game gets the same commands and restore returns the same observation.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Hashable, Literal

from pydantic import Field, model_validator

from outrider.activity import work_item
from outrider.envs.base import ENVS, Demonstration, ReplaySnapshot, Split, StepInfo, Task, TaskConfig
from outrider.envs.child import ChildObject
from outrider.envs.pool import HandlePool
from outrider.errors import OutriderError

CACHE_ENV_VAR = "OUTRIDER_TEXTWORLD_CACHE"
MAX_LEVEL = {"coin_collector": 300, "treasure_hunter": 30}
_PRINTABLE = re.compile(r"[^\n\x20-\x7e]")  # the built-in tokenizer knows printable ASCII and newline only
_ROOM = re.compile(r"-= (.+?) =-")
# the status line the interpreter pads with ~130 spaces after every answer: "-= Cubicle =-0/1" (room, score/moves)
_STATUS = re.compile(r"\s*-= [^\n]+? =-\s*-?\d+/\d+\s*$")
_STATE_KEYS = ("feedback", "description", "inventory", "admissible_commands", "score", "max_score", "won", "lost",
               "objective", "policy_commands")
_PROMPT = re.compile(r"\s*>\s*$")  # the input prompt left before it ("\n\n>", or "... yes or no.>")
# Inform 7's out-of-world actions (Standard Rules) and the parser's own commands, by first word
META_VERBS = frozenset({
    "quit", "q", "restart", "save", "restore", "verify", "undo", "oops", "again", "g",
    "score", "full", "fullscore", "transcript", "script", "unscript", "noscript", "version",
    "verbose", "long", "brief", "normal", "superbrief", "short", "notify", "pronouns", "nouns"})


def clean_text(text: str) -> str:
    """Printable ASCII and newlines only (tabs become spaces), no trailing spaces, at most one blank line."""
    text = _PRINTABLE.sub("", text.replace("\t", " ").replace("\r", ""))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _game_reply(method: str, result: Any) -> Any:
    """What crosses the pipe from the game process: the state's fields this module reads (TextWorld's whole
    `GameState` is ~25 kB pickled; these are ~2 kB)."""
    if method == "reset":
        return {k: result.get(k) for k in _STATE_KEYS}
    if method == "step":
        state, score, done = result
        return {k: state.get(k) for k in _STATE_KEYS}, score, done
    return result


class TextWorldConfig(TaskConfig):
    challenge: Literal["coin_collector", "treasure_hunter"] = Field(
        "coin_collector", description="TextWorld challenge (tw-make's tw-coin_collector / tw-treasure_hunter).")
    level: int = Field(5, ge=1, description="Challenge difficulty (coin_collector 1-300: rooms on the path; "
                                            "treasure_hunter 1-30).")
    train_games: int = Field(64, ge=1, description="Number of distinct games in the train pool (seed % pool).")
    eval_games: int = Field(16, ge=1, description="Number of distinct held-out games in the eval pool.")
    seed: int = Field(0, description="Seed from which every game's generator seed is derived.")
    cache_dir: str | None = Field(None, description="Where generated games are kept; default "
                                                    f"${CACHE_ENV_VAR} or ~/.cache/outrider/textworld.")
    format: Literal["compact", "verbose"] = Field(
        "compact", description="compact: room, exits, objects and a short answer (for tiny char models); "
                               "verbose: the game's own text.")
    objective: bool | None = Field(None, description="Show the game's objective in the first observation; "
                                                     "default: yes for treasure_hunter, no for coin_collector "
                                                     "(whose objective spells out the route).")
    feedback_chars: int = Field(60, ge=0, description="compact: the most characters of the game's answer kept.")
    max_turns: int = Field(10, ge=1, description="Horizon: the most commands in one episode.")
    eval_size: int = Field(16, ge=1, description="Held-out seeds evaluated (capped at eval_games).")

    @model_validator(mode="after")
    def _level(self) -> "TextWorldConfig":
        if self.level > MAX_LEVEL[self.challenge]:
            raise ValueError(f"level {self.level} is out of range for {self.challenge} (1-{MAX_LEVEL[self.challenge]})")
        return self


class TextWorldEnv(ReplaySnapshot):
    """One episode at a time on a pooled TextWorld interpreter (see the module docstring for the format)."""

    def __init__(self, task: "TextWorldTask", split: Split):
        self.task, self.split = task, split
        self._key: Path | None = None
        self._game: Any = None
        self.seed = 0
        self.history: list[str] = []
        self.admissible: list[str] = []
        self._state: Any = None

    # --- pool handling -------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._game is not None:
            self.task.pool.release(self._key, self._game)
            self._game = None

    def close(self) -> None:
        self._release()

    def _call(self, method: str, *args: Any) -> Any:
        """A call to the game interpreter; one that does not finish (the env time limit, Ctrl-C) discards it
        (`HandlePool.call`)."""
        game = self._game
        try:
            return self.task.pool.call(game, game.call, method, *args)
        except BaseException:
            if self._game is game:
                self._game = None
            raise

    # --- Env protocol --------------------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        self._release()
        self.seed = int(seed)
        self._key = self.task.game_path(self.split, self.seed)
        self._game = self.task.pool.acquire(self._key)
        self.history = []
        self._state = self._call("reset")
        self._score = self._state["score"] or 0
        self.admissible = list(self._state["admissible_commands"] or [])
        return self.task.render(self._state, first=True, moved=True)

    def step(self, action: str) -> tuple[str, float, bool, StepInfo]:
        if self._game is None:
            raise RuntimeError("step() before reset()")
        command = " ".join(action.strip().lower().split())
        invalid = command not in self.admissible
        if invalid and (command.split(" ", 1)[0] in META_VERBS or command.startswith("\\")):  # not sent: see above
            self.history.append(command)  # replay refuses it again: the game gets the same commands
            verb = command.split(" ", 1)[0]
            obs = self.task.render({**self._state, "feedback": f"'{verb}' is not allowed in this game."},
                                   first=False, moved=False)
            return obs, 0.0, False, {"success": False, "invalid": True, "admissible": list(self.admissible),
                                     "events": []}
        before = self._room()
        self._state, score, done = self._call("step", command)
        self.history.append(command)
        score = score or 0
        reward = float(score - self._score)
        self._score = score
        self.admissible = list(self._state["admissible_commands"] or [])
        won = bool(self._state["won"])
        info: dict[str, Any] = {"success": won, "invalid": invalid, "admissible": list(self.admissible),
                                "events": ["scored"] if reward > 0 else []}
        if done:
            info["metrics"] = {"moves": float(len(self.history))}
        obs = self.task.render(self._state, first=False, moved=self._room() != before)
        return obs, reward, bool(done), info

    def state_key(self) -> Hashable:
        """The room's description, the inventory and the score: the state as the game reports it."""
        s = self._state
        return (s["description"] or "", s["inventory"] or "", int(self._score))

    def _room(self) -> str:
        m = _ROOM.search(self._state["description"] or "")
        return m.group(1) if m else ""


@ENVS.register("textworld", config=TextWorldConfig)
class TextWorldTask(Task):
    """TextWorld Coin Collector / Treasure Hunter games [Côté et al. 2018], generated once and cached; the
    walkthrough of each train game is its demonstration."""

    def __init__(self, cfg: TextWorldConfig):
        try:
            import textworld
        except ImportError:
            raise OutriderError("task textworld needs the textworld package: pip install 'outrider[agents]'") from None
        self.cfg = cfg
        self._tw = textworld
        self.max_turns = cfg.max_turns
        self.eval_size = min(cfg.eval_size, cfg.eval_games)
        self.show_objective = cfg.objective if cfg.objective is not None else cfg.challenge == "treasure_hunter"
        root = cfg.cache_dir or os.environ.get(CACHE_ENV_VAR) or "~/.cache/outrider/textworld"
        # the TextWorld version is part of the path: another version may generate other games from the same seed
        self.cache_dir = Path(root).expanduser() / f"tw{textworld.__version__}"
        self.infos = textworld.EnvInfos(admissible_commands=True, won=True, lost=True, score=True, max_score=True,
                                        policy_commands=True, description=True, inventory=True, feedback=True,
                                        objective=True)
        self.pool = HandlePool(self._start_game, lambda game: game.close(), kill=lambda game: game.kill())
        self._demos: dict[int, Demonstration] = {}

    # --- games ---------------------------------------------------------------------------------------------
    def _start_game(self, path: Path) -> ChildObject:
        """A game interpreter in a child process (see the module docstring)."""
        return ChildObject(lambda: self._tw.start(str(path), request_infos=self.infos), _game_reply)

    def game_seed(self, split: Split, index: int) -> int:
        c = self.cfg
        digest = hashlib.sha256(f"textworld:{c.challenge}:{c.level}:{split}:{index}:{c.seed}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % (2**31 - 1)

    def game_path(self, split: Split, seed: int) -> Path:
        """The cached game file for an env seed of `split`, generated first if missing."""
        index = seed % (self.cfg.eval_games if split == "eval" else self.cfg.train_games)
        c = self.cfg
        path = self.cache_dir / f"{c.challenge}-l{c.level}-{self.game_seed(split, index)}.z8"
        if not (path.exists() and path.with_suffix(".json").exists()):
            self._generate(path, self.game_seed(split, index))
        return path

    def _generate(self, path: Path, game_seed: int) -> None:
        from textworld.challenges import CHALLENGES
        from textworld.generator import compile_game

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=path.parent))
        try:
            options = self._tw.GameOptions()
            options.seeds = game_seed
            options.path = str(tmp / path.name)
            options.force_recompile = True
            with work_item("TextWorld games generated"):  # seconds each: show that work goes on
                game = CHALLENGES[f"tw-{self.cfg.challenge}"][1]({"level": self.cfg.level}, options)
                compile_game(game, options)
            # json first, z8 last: a game is used only when both exist, so a kill between the two is harmless
            os.replace(tmp / path.with_suffix(".json").name, path.with_suffix(".json"))
            os.replace(tmp / path.name, path)
        except Exception as e:
            raise OutriderError(f"task textworld: generating {path.name} failed: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- text ----------------------------------------------------------------------------------------------
    def render(self, state: Any, first: bool, moved: bool) -> str:
        """The observation text of a game state in the configured format."""
        feedback = state["feedback"] or ""
        objective = clean_text(state["objective"] or "")
        if first:  # drop the ASCII-art banner: everything before the objective
            at = feedback.find((state["objective"] or "").strip()[:40]) if objective else -1
            feedback = feedback[at:] if at >= 0 else feedback
        # the padded status line ("-= Room =-0/1") ends every answer, after the prompt when there is one
        feedback = clean_text(_PROMPT.sub("", _STATUS.sub("", feedback)))
        if self.cfg.format == "verbose":
            if first and not self.show_objective and objective:
                feedback = clean_text(feedback.replace(objective, "", 1))
            feedback = clean_text(re.sub(r" {2,}", " ", feedback))  # padding ("    *** The End ***")
            return feedback + "\n> "
        return self._compact(state, feedback, objective, first, moved)

    def _compact(self, state: Any, feedback: str, objective: str, first: bool, moved: bool) -> str:
        admissible = [clean_text(c) for c in state["admissible_commands"] or []]  # names: printable ASCII too
        m = _ROOM.search(state["description"] or "")
        room = clean_text(m.group(1)) if m else "somewhere"
        exits = [c[3:] for c in admissible if c.startswith("go ")]
        here = list(dict.fromkeys(c[5:].split(" from ")[0] for c in admissible if c.startswith("take ")))
        held = [c[5:] for c in admissible if c.startswith("drop ")]
        parts = []
        if first and self.show_objective and objective:
            parts.append(f"goal: {objective}\n")
        if not moved and not first and feedback and not _ROOM.search(feedback):  # a room text: the line says it
            sentence = re.split(r"(?<=[.!?])\s", feedback.replace("\n", " "), maxsplit=1)[0]
            sentence = sentence[: self.cfg.feedback_chars].strip()
            if sentence:  # feedback_chars: 0 keeps none, and no stray space
                parts.append(sentence + " ")
        line = f"{room}. exits: {' '.join(exits) or 'none'}."
        if here:
            line += f" here: {', '.join(here)}."
        if held:
            line += f" carrying: {', '.join(held)}."
        return "".join(parts) + line + "\n> "

    # --- Task ----------------------------------------------------------------------------------------------
    def make_env(self, split: Split) -> TextWorldEnv:
        return TextWorldEnv(self, split)

    def demonstrations(self, seeds: list[int]) -> list[Demonstration]:
        """The walkthrough (TextWorld's winning policy commands) of each seed's train game, replayed through the
        env to record its observations; one per game, cached."""
        out = []
        for seed in seeds:
            index = seed % self.cfg.train_games
            if index not in self._demos:
                self._demos[index] = self._walkthrough(index)
            out.append(self._demos[index])
        return out

    def _walkthrough(self, seed: int) -> Demonstration:
        """Replay the game's walkthrough; raise when it does not win or needs more than max_turns commands (a
        walkthrough is not cut: a cut one would be a losing demonstration)."""
        env = TextWorldEnv(self, "train")
        obs = env.reset(seed)
        commands = list(env._state["policy_commands"] or [])
        turns, won = [], False
        try:
            for c in commands:
                turns.append((obs, c))
                obs, _, done, info = env.step(c)
                if done:
                    won = bool(info["success"])
                    break
        finally:
            env.close()
        name = self.game_path("train", seed).name
        if not won:
            raise OutriderError(f"task textworld: the walkthrough of train game {name} does not win when replayed "
                                f"({len(turns)} commands)")
        if len(turns) > self.max_turns:
            raise OutriderError(f"task textworld: the walkthrough of train game {name} needs {len(turns)} commands, "
                                f"more than task.max_turns={self.max_turns}: set task.max_turns >= {len(turns)} "
                                f"(or a lower task.level)")
        return Demonstration(turns)

    def close(self) -> None:
        """Close every pooled interpreter."""
        self.pool.close()
