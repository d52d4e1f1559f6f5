#!/usr/bin/env python
"""Launch a neox run from GPT-NeoX YAML configs.

    python deepy.py [--dry-run] USER_SCRIPT [-d CONF_DIR] CONF [CONF ...]

Resolves the configs (merge, derive, validate) and starts the ranks through DeepSpeed's runner, or
srun for ``launcher: slurm`` with ``deepspeed_slurm: true``. ``--dry-run`` prints one JSON object
(the resolved arguments, the DeepSpeed config, the launch command and a warning for each data,
tokenizer or checkpoint path not found here) and launches nothing. SIGTERM or SIGINT (Ctrl-C) to
deepy.py makes the ranks save at the next step boundary and stop; deepy.py then exits with their
status, leaving no process behind (a second signal kills them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neox.errors import exit_code_of


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and launch command, run nothing")
    parser.add_argument("user_script", help="the script every rank runs, e.g. train.py")
    parser.add_argument("-d", "--conf_dir", default=None, help="directory the config paths are relative to")
    parser.add_argument("conf_file", nargs="+", help="NeoX YAML config files, merged (a key set in two with different values is an error)")
    # the overrides GPT-NeoX's deepy.py accepts
    parser.add_argument("--wandb_group", default=None, help="W&B group (overrides the config)")
    parser.add_argument("--wandb_team", default=None, help="W&B team (overrides the config)")
    parser.add_argument("--eval_tasks", nargs="+", default=None, help="lm-eval tasks (overrides the config; eval.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    cli = parse_cli(sys.argv[1:] if argv is None else argv)
    from neox.config import NeoXArgs, fast_path
    from neox.errors import ConfigError
    from neox.launcher import build_launch_command, launch, planned_world_size

    if not os.path.isfile(cli.user_script):
        raise ConfigError(f"{cli.user_script}: user script not found")

    overrides = {k: v for k, v in (("wandb_group", cli.wandb_group), ("wandb_team", cli.wandb_team),
                                   ("eval_tasks", cli.eval_tasks)) if v is not None}
    # the launcher counts the ranks (GPUs here, a hostfile, SLURM's variables): resolving the YAML does not
    args = NeoXArgs.from_ymls(cli.conf_file, overrides, conf_dir=cli.conf_dir, plan_world=planned_world_size)
    from neox.config.validate import input_file_problems, script_input_problems, validate_for_script

    validate_for_script(args, cli.user_script)  # e.g. generate.py's text_gen_type: refused before any launch
    script_inputs = list(script_input_problems(args, cli.user_script))
    if cli.dry_run:
        # a dry run plans runs where the data is not, so missing inputs are warnings, not errors
        warnings = [str(problem) for problem in [*input_file_problems(args), *script_inputs]]
        for warning in warnings:
            print(f"neox: warning: {warning}", file=sys.stderr)
        report = {
            "args": args.to_flat(),
            "deepspeed_config": args.deepspeed_config(),
            "launch_command": build_launch_command(args, cli.user_script),
            "warnings": warnings,
        }
        print(json.dumps(report, indent=2, sort_keys=True))
        for line in fast_path.plan_lines(args):  # what the ranks will choose (stdout stays one JSON object)
            print(f"neox: ranks will run {line}", file=sys.stderr)
        return 0
    if script_inputs and not (args.launcher.hostfile or args.launcher.deepspeed_slurm):
        raise script_inputs[0]  # a local launch: the ranks would find the same
    return launch(args, cli.user_script)


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
