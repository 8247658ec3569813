"""Does this GPU's attention give finite fine-tuning gradients on left-padded batches?

Run: `python -m tasks.finetune.attention_check [--json FILE]`.

A randomly initialised model of SmolLM2-135M's shape takes fine-tuning's loss (`training.loss_backward`) on
left-padded batches: the micro-batch at which every trial of the H200 `mini` table met a non-finite gradient (16
rows, 192 tokens wide), then pairs of a full row and a 3-token row at widths around multiples of 128. Each batch runs
forward and backward twice, with torch's default attention backends and with `training.TRAIN_ATTENTION`, and the
number of non-finite gradient tensors of each is printed (and written as JSON with `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.finetune.scoring import Encoded, collate
from tasks.finetune.training import TRAIN_ATTENTION, loss_backward

# SmolLM2-135M's shape (its config.json on the hub); the weights are random: the failure does not depend on them.
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True}
# (tokens, answer tokens) of the rows of step 576's micro-batch, as the trials' `skipped_step.576` tag names them.
STEP_576 = [(86, 24), (192, 1), (42, 6), (27, 4), (116, 1), (111, 41), (185, 1), (48, 13), (112, 50), (46, 15),
            (31, 4), (11, 3), (97, 42), (29, 9), (31, 3), (34, 20)]
WIDTHS = [128, 176, 192, 200, 256, 320]


def nonfinite_grads(model: LlamaForCausalLM, shapes: list[tuple[int, int]], device: str, training: bool) -> int:
    """Gradient tensors with a non-finite entry after the loss of left-padded random rows of (tokens, answer)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [Encoded(torch.randint(1, vocab, (n,), generator=gen).tolist(), k) for n, k in shapes]
    model.zero_grad(set_to_none=True)
    loss_backward(model, collate(rows, 0, device), 1, TRAIN_ATTENTION if training else None)
    return sum(not bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=SMOLLM2_SHAPE["num_hidden_layers"], help="fewer: faster")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE | {"num_hidden_layers": args.layers},
                                         attn_implementation="sdpa"))
    model.to(args.device, torch.bfloat16).train()
    cases = {"step 576 (16 rows, 192 wide)": STEP_576} | {f"width {w}": [(w, 4), (3, 2)] for w in WIDTHS}
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
           "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "cases": {}}
    for name, shapes in cases.items():
        counts = {"default": nonfinite_grads(model, shapes, args.device, False),
                  "training": nonfinite_grads(model, shapes, args.device, True)}
        out["cases"][name] = counts
        print(f"{name:30s} non-finite gradient tensors: default backends {counts['default']:3d}, "
              f"training's {counts['training']:3d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
