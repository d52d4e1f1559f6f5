"""Shared by the lm-eval tests: offline task folders, a tiny LLaMA checkpoint (quickstart tokenizer) and
its Hugging Face export, and the harness's own HF backend run on that export as the reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
TASKS_SRC = ROOT / "tests" / "fixtures" / "eval_tasks"
TOKENIZER = str(ROOT / "datasets" / "quickstart" / "tokenizer.model")
VOCAB = 8192
TASKS = ["arith_mc", "arith_gen", "arith_ppl"]


def offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def task_dir(tmp: Path) -> str:
    """The fixture task YAMLs with their data_files made absolute (the harness reads them from the cwd)."""
    out = Path(tmp) / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for y in TASKS_SRC.glob("*.yaml"):
        text = y.read_text()
        for data in TASKS_SRC.glob("*.jsonl"):
            text = text.replace(f": {data.name}", f": {data}")
        (out / y.name).write_text(text)
    return str(out)


def model_flat(**over: Any) -> dict[str, Any]:
    """Flat NeoX keys of the tiny model (hidden 64, 2 layers, GQA) on the quickstart tokenizer."""
    flat = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "seq_length": 64,
        "max_position_embeddings": 128, "intermediate_size": 224, "norm": "rmsnorm", "rms_norm_epsilon": 1e-5,
        "pos_emb": "rotary", "rotary_emb_base": 10000.0, "mlp_type": "llama", "activation": "silu", "use_bias_in_norms": False,
        "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "no_weight_tying": True,
        "make_vocab_size_divisible_by": 128, "tokenizer_type": "SPMTokenizer", "vocab_file": TOKENIZER,
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "pipe_parallel_size": 0,
        "model_parallel_size": 1, "eval_batch_size": 4, "eval_bootstrap_iters": 0,
    }
    flat.update(over)
    return flat


def tool(name: str) -> Any:
    from tests.unit.test_convert_meta import tool as _tool

    return _tool(name)


def make_checkpoints(root: Path) -> tuple[str, str]:
    """A random LLaMA (large init, so greedy choices are clear) as a neox checkpoint and as its HF export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neox.config import NeoXArgs

    root = Path(root)
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.3)
    LlamaForCausalLM(conf).save_pretrained(root / "hf_src")
    args = NeoXArgs.from_flat(model_flat(), world_size=1)
    tool("convert_hf_to_neox").convert(root / "hf_src", args.model, root / "ckpt", 1, progress=False)
    tool("convert_neox_to_hf").convert(root / "ckpt", args.model, root / "hf", vocab_size=VOCAB,
                                       tokenizer=args.tokenizer)
    return str(root / "ckpt"), str(root / "hf")


def evaluate(lm: Any, tasks_dir: str, tasks: list[str] = TASKS, **kw: Any) -> dict[str, Any] | None:
    """``simple_evaluate`` of the fixture tasks on a harness LM (NeoXLM or the HF backend's HFLM)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, batch_size=4, bootstrap_iters=0, log_samples=True,
                           task_manager=TaskManager(include_path=tasks_dir), **kw)


def per_request(res: dict[str, Any], task: str) -> list[tuple[Any, Any]]:
    """(arguments, responses) of each request of a task's samples, in document order."""
    return [(s["arguments"], s["resps"]) for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def neox_lm(ckpt: str, **over: Any) -> Any:
    """A NeoXLM over the checkpoint, in this process's parallel layout."""
    from neox.config import NeoXArgs
    from neox.eval.lm import NeoXLM
    from neox.generation import load_weights
    from neox.model import GPTModel
    from neox.tokenizer.build import build_tokenizer

    world = over.pop("world_size", 1)
    args = NeoXArgs.from_flat(model_flat(**over), world_size=world)
    model = GPTModel(args.model).eval()
    load_weights(model, ckpt, args.model)
    return NeoXLM(model, build_tokenizer(args.tokenizer), batch_size=args.eval.eval_batch_size), args
