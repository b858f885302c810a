"""Evaluating transcoders: NMSE, L0, dead features, spliced-in KL and top-1 agreement."""

from cltrace.eval.evaluate import evaluate, format_table

__all__ = ["evaluate", "format_table"]
