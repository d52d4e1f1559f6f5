#!/usr/bin/env python
"""Generate text on every rank: ``python deepy.py generate.py CONF...`` starts this once per rank.

NeoX keys: ``text_gen_type`` (unconditional, input-file, interactive), ``sample_input_file``,
``sample_output_file`` (JSON lines ``{"context", "text"}``), ``maximum_tokens``, ``temperature``
(0 = greedy), ``top_k``, ``top_p``, ``recompute`` (no KV cache). Weights come from ``load``, else from the
latest checkpoint under ``save`` (so the training config works unchanged), in any saved TP/PP layout, and
are resharded on the fly to this run's ``model_parallel_size``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from neox.errors import exit_code_of


def run(args: Any) -> dict[str, float]:
    """Build the model at this run's TP size, load its checkpoint, generate per ``text_gen_type``."""
    import torch

    from neox.config.run import inference_load_dir
    from neox.config.validate import script_inputs_exist, validate_for_script
    from neox.generation import Generator, SamplingParams, run_mode
    from neox.inference import load_model

    validate_for_script(args, "generate.py")  # deepy.py checked these before launching; a direct start had not
    script_inputs_exist(args, "generate.py")
    load = inference_load_dir(args.checkpoint)
    model, tokenizer, args = load_model(args, load)
    tg = args.textgen
    params = SamplingParams(maximum_tokens=tg.maximum_tokens, temperature=tg.temperature, top_k=tg.top_k,
                            top_p=tg.top_p, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size,
                            use_cache=not tg.recompute)
    rng = torch.Generator().manual_seed(args.training.seed)
    totals = run_mode(Generator(model, tokenizer, params, rng), tg)
    if int(os.environ.get("RANK", "0")) == 0:
        where = "" if tg.text_gen_type == "interactive" else f" -> {tg.sample_output_file}"
        print(f"generated {totals['samples']} sample(s), {totals['tokens']} tokens in {totals['seconds']:.1f} s "
              f"({totals['tokens_per_sec']:.1f} tokens/s){where}", file=sys.stderr)
    return totals


def main() -> None:
    from neox.handoff import rank_args

    run(rank_args())  # process groups are released at exit (pretrain.shutdown via atexit)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
