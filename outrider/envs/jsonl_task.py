"""A user's file of ``{"prompt": ..., "answer": ...}`` lines, verified by exact or numeric match."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from outrider.answers import numeric_equal
from outrider.envs.base import ENVS, Split
from outrider.envs.single_turn import SingleTurnConfig, SingleTurnTask
from outrider.errors import OutriderError
from outrider.jsonl import json_objects


class JsonlConfig(SingleTurnConfig):
    path: str = Field(..., description="JSONL file, one {\"prompt\": str, \"answer\": str|number} object per line.")
    eval_path: str | None = Field(None, description="Held-out file; without it a hash of each prompt picks the "
                                                    "eval_fraction held out.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share held out when eval_path is not given.")
    match: Literal["exact", "numeric"] = Field("exact", description="How an answer is compared to the reference.")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    for n, row in json_objects(path, "task.path"):
        if "prompt" not in row or "answer" not in row:
            raise OutriderError(f"{path}:{n}: expected an object with keys \"prompt\" and \"answer\"")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str):
            raise OutriderError(f"{path}:{n}: \"prompt\" must be a string (got {json.dumps(prompt)})")
        # a number is an answer as its text (42, 0.5); null, true/false, lists and objects are not answers
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise OutriderError(f"{path}:{n}: \"answer\" must be a string or a number (got {json.dumps(answer)})")
        rows.append({"question": prompt, "answer": str(answer)})
    if not rows:
        raise OutriderError(f"{path}: no problems in the file")
    return rows


def _held_out(prompt: str, fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@ENVS.register("jsonl", config=JsonlConfig)
class JsonlTask(SingleTurnTask):
    """Train and eval are disjoint: the same prompt always lands in the same split (hash), or eval_path is used
    and its prompts are removed from the train file."""

    def __init__(self, cfg: JsonlConfig):
        super().__init__(cfg)
        self.cfg: JsonlConfig = cfg
        rows = read_jsonl(cfg.path)
        if cfg.eval_path:
            self._eval_rows = read_jsonl(cfg.eval_path)
            held = {r["question"] for r in self._eval_rows}
            self._train_rows = [r for r in rows if r["question"] not in held]
        else:
            self._train_rows = [r for r in rows if not _held_out(r["question"], cfg.eval_fraction)]
            self._eval_rows = [r for r in rows if _held_out(r["question"], cfg.eval_fraction)]
        for name, split in (("train", self._train_rows), ("eval", self._eval_rows)):
            if not split:
                raise OutriderError(f"task.path: the {name} split of '{cfg.path}' is empty; add lines or set eval_path")
        self.eval_size = min(cfg.eval_size, len(self._eval_rows))
        self.check_template()

    def problem(self, split: Split, index: int) -> dict[str, Any]:
        rows = self._eval_rows if split == "eval" else self._train_rows
        return rows[index % len(rows)]

    def verify(self, problem: dict[str, Any], answer: str) -> float:
        if self.cfg.match == "numeric":
            return float(numeric_equal(answer, problem["answer"]))
        return float(answer == problem["answer"].strip())
