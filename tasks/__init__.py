"""Task registry: one subpackage per experiment family, imported lazily by name."""

from __future__ import annotations

from importlib import import_module

from tasks.base import Diverged, LocalContext, Resources, Task, TaskConfig, TrialContext

# name -> "module:Class". Adding a task: one subpackage plus one line here.
REGISTRY: dict[str, str] = {
    "llm_pretrain": "tasks.llm_pretrain.task:LLMPretrainTask",
    "rl": "tasks.rl.task:RLTask",
    "forecasting": "tasks.forecasting.task:ForecastingTask",
    "finetune": "tasks.finetune.task:FinetuneTask",
}


def available() -> list[str]:
    return sorted(REGISTRY)


def get_task(name: str) -> Task:
    """An instance of the task called `name` (KeyError naming the valid choices otherwise)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(available())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["Diverged", "LocalContext", "Resources", "Task", "TaskConfig", "TrialContext", "available", "get_task"]
