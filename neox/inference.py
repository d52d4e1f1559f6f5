"""The model that generate.py and eval.py run: this rank's process groups, the tokenizer, the model at the
run's tensor-parallel size in the precision it runs in, and the checkpoint's weights in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from neox.config import NeoXArgs
    from neox.model import GPTModel
    from neox.tokenizer.base import Tokenizer


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16/fp16 as configured on a GPU; fp32 on the CPU (bf16 matmuls are slow there, fp16 unsupported, and the
    CPU reference scores are compared in fp32)."""
    if device.type != "cuda":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_model(args: NeoXArgs, load: str) -> tuple[GPTModel, Tokenizer, NeoXArgs]:
    """(model in eval mode with ``load``'s weights, tokenizer, args with the vocabulary size filled in)."""
    from neox.generation import load_weights
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer
    from neox.training.pretrain import init_distributed

    device = init_distributed(args)
    tokenizer = build_tokenizer(args.tokenizer)
    if args.model.padded_vocab_size is None:
        args = args.with_vocab_size(tokenizer.vocab_size)
    dtype = inference_dtype(args.precision.precision, device)
    model = GPTModel(args.model, seed=args.training.seed, device=device, dtype=dtype).eval()
    load_weights(model, load, args.model)
    return model, tokenizer, args
