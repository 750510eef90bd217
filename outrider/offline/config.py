"""The offline config (`outrider offline train CONFIG`): pydantic only, so the recipe reference and `outrider
compare` read it without importing torch or the environments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from outrider.errors import OutriderError
from outrider.recipe import apply_overrides
from outrider.registry import Options, format_validation_error

METHODS = ("oppo", "bc", "bt_filtered_bc")
TEXT_ENVS = ("bandit",)  # data.env values that take policy lm (outrider.offline.text)


class DataConfig(Options):
    """Where the offline dataset comes from."""

    path: str | None = Field(None, description="A dataset directory (trajectories.jsonl + pairs.jsonl, see "
                                               "docs/preference.md); null: generate one with the fields below.")
    env: str = Field("MiniGrid-DoorKey-6x6-v0", description="MiniGrid level (policy mlp) or `bandit` (policy lm, "
                                                             "outrider.envs.bandit): the dataset's train layouts and "
                                                             "the held-out evaluation layouts.")
    env_options: dict[str, Any] = Field(default_factory=dict, description="Options of a text env (bandit: arms, "
                                        "pulls, gap, distribution, expert, ... as in its task section).")
    expert: int = Field(100, ge=0, description="Trajectories of the expert (MiniGrid: BFS; bandit: its `expert`, "
                                               "Thompson sampling by default).")
    noisy: int = Field(100, ge=0, description="Trajectories of the ε-noisy expert.")
    random: int = Field(100, ge=0, description="Trajectories of the uniformly random policy.")
    epsilon: float = Field(0.5, ge=0, le=1, description="The noisy expert's probability of a random action.")
    pairs: int = Field(1000, ge=1, description="Preference pairs, drawn uniformly among distinct trajectories.")
    label_noise: float = Field(0.0, ge=0, le=0.5, description="Rate at which a strict preference label is flipped.")
    horizon: int = Field(50, ge=1, description="Steps per episode (dataset and evaluation; a bandit's episode is "
                                               "its `pulls`).")
    seed: int | None = Field(None, description="Generation seed; null: the run's seed.")


class OfflineConfig(Options):
    """An offline preference run: the method, its constants, the data and the evaluation."""

    method: Literal["oppo", "bc", "bt_filtered_bc"] = Field("oppo", description="oppo, bc (plain behaviour "
                                                            "cloning) or bt_filtered_bc (Bradley–Terry reward + BC "
                                                            "on the top `keep` trajectories).")
    policy: Literal["mlp", "lm"] = Field("mlp", description="mlp: MLP encoder and policy on MiniGrid state "
                                         "vectors; lm: the tiny LM on a text env's observations, z as "
                                         "`prefix_tokens` input embeddings (outrider.offline.text).")
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset.")
    seed: int = Field(0, description="Seed of the networks' init, the batches and (by default) the data.")
    steps: int = Field(2000, ge=1, description="Policy-training steps (bt_filtered_bc adds reward_steps first).")
    batch: int = Field(32, ge=1, description="Trajectories per HIM / BC batch.")
    pair_batch: int = Field(32, ge=1, description="Pairs per preference batch (OPPO's encoder and z*, BT reward).")
    hidden: int = Field(64, ge=4, description="Hidden width of every MLP (encoder, policy, reward).")
    z_dim: int = Field(8, ge=1, description="OPPO: size of z (the authors' default 8).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the policy, encoder and reward model.")
    z_init: float = Field(2.0, ge=0, description="OPPO: std of z*'s Gaussian init (the authors' 2).")
    z_max_norm: float | None = Field(1.0, gt=0, description="OPPO: project z* into the ball of this radius after "
                                     "each step (the encoder's norm penalty's radius); null: free z*, as in the paper.")
    z_lr: float = Field(1e-2, gt=0, description="OPPO: AdamW learning rate of z* (the authors' w_lr is 1e-3 over "
                                                "100k steps; runs here are 2k).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (the authors' 1e-4).")
    pref_weight: float = Field(0.1, ge=0, description="OPPO: weight of the preference loss in the encoder's loss.")
    norm_weight: float = Field(0.1, ge=0, description="OPPO: weight of the norm penalty max(‖z‖ − 1, 0).")
    margin: float = Field(1.0, ge=0, description="OPPO: triplet margin for strict pairs (ties use 0).")
    state_noise: float = Field(0.1, ge=0, description="OPPO: std of Gaussian noise on states in the HIM step.")
    reward_steps: int = Field(1000, ge=1, description="bt_filtered_bc: Bradley–Terry steps before cloning.")
    keep: float = Field(0.3, gt=0, le=1, description="bt_filtered_bc: fraction of trajectories cloned (top by R̂).")
    eval_episodes: int = Field(100, ge=1, description="Held-out episodes per evaluation (greedy actions).")
    eval_every: int = Field(500, ge=0, description="Evaluate every this many steps (0: only at the end).")
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint every this many steps.")
    threads: int = Field(1, ge=1, description="torch threads (small MLPs: more threads only add contention).")
    lm_hidden: int = Field(64, ge=8, description="policy lm: hidden size of the tiny LM (policy, encoder, reward).")
    lm_layers: int = Field(2, ge=1, description="policy lm: layers of the policy's tiny LM.")
    lm_heads: int = Field(4, ge=1, description="policy lm: attention heads (divides lm_hidden).")
    encoder_layers: int = Field(1, ge=1, description="policy lm: layers of the encoder's (and BT reward's) tiny LM.")
    prefix_tokens: int = Field(4, ge=1, description="policy lm, OPPO: input embeddings z is projected to, placed "
                                                    "before the text.")

    @model_validator(mode="after")
    def _policy_fits_env(self) -> "OfflineConfig":
        text = self.data.env in TEXT_ENVS
        if self.policy == "lm" and not text:
            raise ValueError(f"policy lm needs a text env as data.env ({', '.join(TEXT_ENVS)}), not "
                             f"'{self.data.env}'")
        if self.policy == "mlp" and text:
            raise ValueError(f"data.env '{self.data.env}' is a text env: set policy: lm")
        if self.lm_hidden % self.lm_heads:
            raise ValueError(f"lm_heads ({self.lm_heads}) must divide lm_hidden ({self.lm_hidden})")
        return self


def load_config(path: str | None, overrides: list[str]) -> OfflineConfig:
    if path and not Path(path).is_file():
        raise OutriderError(f"no such file '{path}'")
    data: Any = yaml.safe_load(Path(path).read_text()) if path else {}
    data = apply_overrides(data or {}, overrides)
    try:
        return OfflineConfig.model_validate(data)
    except ValidationError as e:
        raise OutriderError(format_validation_error(e, "", OfflineConfig)) from None


def is_offline_config(data: Any) -> bool:
    """An offline config names a top-level `method` and no `task` (every recipe has a `task`)."""
    return isinstance(data, dict) and "method" in data and "task" not in data
