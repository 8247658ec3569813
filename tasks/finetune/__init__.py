"""Fine-tuning task family: causal LMs (full or LoRA) on commonsense-reasoning multiple choice, registry optimizers.

`tasks.finetune.task` holds `FinetuneTask` (importable without loading transformers models), `config` the schema
and presets, `formats` the prompts of each set, `data` the local / hub / packaged sources, `model` the model
loading and LoRA, `scoring` the log-likelihood scoring, `training` the trial loop, and `start_scores` the cache
of the scores before fine-tuning.
"""

from tasks.finetune.config import FinetuneConfig
from tasks.finetune.task import FinetuneTask

__all__ = ["FinetuneConfig", "FinetuneTask"]
