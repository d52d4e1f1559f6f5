"""lm-evaluation-harness integration: ``NeoXLM`` (neox.eval.lm), task runs and result files
(neox.eval.harness), the in-training hook (neox.eval.training). lm_eval is imported only when used."""
