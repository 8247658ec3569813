"""Trial specifications: what one trial runs, and its content hash (the trial's identity across invocations)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TrialSpec(BaseModel):
    """task + resolved task config + optimizer + hyperparameters + seed.

    `config` holds the task's full resolved config (preset and overrides applied), so two specs that train the same
    thing have the same key whatever preset name or defaults led to them. `preset` is kept for display only;
    `runtime` holds the config fields that choose how the trial executes (its config's ``runtime_fields``) at their
    defaults: the key reads those, so a trial run compiled or eager is the same trial. `unset` holds what the task
    gives a trial that leaves a hyperparameter unset (its config's ``unset_hparams``: the learning rate): a trial
    that sets one to that very value trains the same, and the key reads it as unset, so a learning-rate sweep through
    the preset's rate shares that trial with the tables that leave the rate to the preset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str
    preset: str
    config: dict[str, Any]
    optimizer: str
    hparams: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    runtime: dict[str, Any] = Field(default_factory=dict)
    unset: dict[str, Any] = Field(default_factory=dict)

    def canonical(self) -> str:
        body: dict[str, Any] = {k: getattr(self, k) for k in ("task", "optimizer", "seed")}
        body["hparams"] = {k: v for k, v in self.hparams.items() if k not in self.unset or v != self.unset[k]}
        body["config"] = {**self.config, **self.runtime}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)

    def key(self) -> str:
        """Content hash: equal for trials that would train the same way."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def label(self) -> str:
        hp = ",".join(f"{k}={v}" for k, v in sorted(self.hparams.items()))
        return f"{self.task}/{self.preset} {self.optimizer}({hp}) seed={self.seed}"
