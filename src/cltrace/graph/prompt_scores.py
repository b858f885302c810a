"""The replacement and completeness scores of attribution graphs over a set of prompts: how much of
the model's computation a transcoder explains on prompts of the kinds the "Circuit Tracing" paper
studies, beside the held-out metrics `cltrace eval` prints.

Each prompt's graph is built as `cltrace trace` builds it (`attribute` on the replacement model,
targets the top logits, `AttributionConfig`'s settings) and scored unpruned by `graph_scores` in
both definitions: cltrace's (every error node counts) and circuit-tracer's (the BOS position's
error nodes left out), whose figures are the published ones. The set's scores are the mean and the
median over its prompts (a prompt whose score is undefined, NaN, is left out of them).

A prompt set is a JSON Lines file: one object per line with a "prompt" string (other keys, such as
"kind", are ignored); blank lines are skipped. The committed set, `prompts/eval_prompts.jsonl` in this
package, was written for this and is shared with no benchmark or tuning set.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cltrace.errors import CltraceError, first_line
from cltrace.graph.attribution import attribute
from cltrace.graph.config import AttributionConfig, PromptSetConfig
from cltrace.graph.prune import graph_scores
from cltrace.model.load import LoadedModel
from cltrace.replacement import ReplacementModel

#: The committed prompt set (package data, so that it ships in the wheel).
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "eval_prompts.jsonl"

#: The scores reported for each prompt, named as `PruneResult` names them.
SCORE_NAMES = ("replacement_score", "completeness_score", "replacement_score_no_bos", "completeness_score_no_bos")

_FORMAT_HINT = 'each line is a JSON object such as {"prompt": "The capital of France is"}'


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of a JSON Lines prompt set (None: the committed one), in file order; every
    problem (missing, unreadable, empty, a line that is not JSON or has no "prompt" string) is one
    CltraceError line naming the file."""
    path = DEFAULT_PROMPTS if path is None else Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CltraceError(f"prompts file '{path}' {what}; {_FORMAT_HINT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CltraceError(f"cannot read prompts file '{path}': {first_line(exc)}") from None
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer too long to read
            raise CltraceError(f"prompts file '{path}', line {lineno}: not JSON ({first_line(exc)}); {_FORMAT_HINT}") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CltraceError(f"prompts file '{path}', line {lineno}: no \"prompt\" string; {_FORMAT_HINT}")
        prompts.append(prompt)
    if not prompts:
        raise CltraceError(f"prompts file '{path}' has no prompts; {_FORMAT_HINT}")
    return prompts


def encode_prompts(model: LoadedModel, prompts: Sequence[str], config: PromptSetConfig | None = None) -> list[torch.Tensor]:
    """Token ids [pos] (BOS first) of the first `config.max_prompts` prompts; a prompt of more than
    `config.max_prompt_tokens` tokens is refused in one line, before any graph is computed."""
    cfg = config or PromptSetConfig()
    cfg.validate()
    if not prompts:
        raise CltraceError("the prompt set is empty: give at least one prompt")
    ids = []
    for i, prompt in enumerate(prompts[: cfg.max_prompts]):
        tokens = model.encode(prompt)  # [pos]
        if tokens.shape[-1] > cfg.max_prompt_tokens:
            shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise CltraceError(
                f"prompt {i + 1} ({shown!r}) is {tokens.shape[-1]} tokens, more than max_prompt_tokens "
                f"({cfg.max_prompt_tokens}): shorten it or raise the limit"
            )
        ids.append(tokens)
    return ids


def prompt_set_scores(
    replacement: ReplacementModel,
    prompts: Sequence[str],
    config: PromptSetConfig | None = None,
    attribution: AttributionConfig | None = None,
    progress: bool = True,
    encoded: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The replacement and completeness scores (both definitions) of the attribution graph of each
    of the first `config.max_prompts` prompts, and their mean and median over the prompts.

    `attribution`: how each graph is computed (None: `AttributionConfig()`, as `cltrace trace`; its
    own progress bar is off, one bar over the prompts on stderr instead where `progress`).
    `encoded`: the prompts as `encode_prompts` gave them, where a caller checked them already.

    Returns a JSON-ready dict: `n_prompts` (scored), `n_given`, `prompts` (per prompt: the prompt, its
    tokens, its top target and the four scores, NaN written as None), `mean` and `median` (each
    score's, None where no prompt has it defined).
    """
    # every length checked before the first graph
    ids = list(encoded) if encoded is not None else encode_prompts(replacement.model, prompts, config)
    per_prompt = []
    for prompt, tokens in zip(prompts, tqdm(ids, desc="graphs", unit="prompt", file=sys.stderr, disable=not progress)):
        graph = attribute(replacement, tokens, config=attribution, progress=False)
        scores = dict(zip(SCORE_NAMES[:2], graph_scores(graph)))
        scores.update(zip(SCORE_NAMES[2:], graph_scores(graph, bos_errors=False)))
        targets = graph.metadata.get("targets") or [{}]
        per_prompt.append({"prompt": prompt, "n_tokens": int(tokens.shape[-1]), "target": targets[0].get("label"),
                           **{k: v if math.isfinite(v) else None for k, v in scores.items()}})
    return {"n_prompts": len(per_prompt), "n_given": len(prompts), "prompts": per_prompt,
            "mean": _summary(per_prompt, statistics.fmean), "median": _summary(per_prompt, statistics.median)}


def _summary(per_prompt: list[dict[str, Any]], how: Any) -> dict[str, float | None]:
    """`how` (mean or median) of each score over the prompts where it is defined."""
    out: dict[str, float | None] = {}
    for name in SCORE_NAMES:
        values = [p[name] for p in per_prompt if p[name] is not None]
        out[name] = float(how(values)) if values else None
    return out


def format_prompt_scores(scores: dict[str, Any]) -> str:
    """The prompt set's mean and median scores as a plain-text block (for beside `format_table`)."""
    given = f" of {scores['n_given']}" if scores["n_given"] != scores["n_prompts"] else ""
    lines = [
        f"attribution graphs on {scores['n_prompts']}{given} prompts",
        f"{'':35}{'mean':>7}  {'median':>7}",
    ]
    labels = {"replacement_score": "replacement score", "completeness_score": "completeness score",
              "replacement_score_no_bos": "replacement score, no BOS errors", "completeness_score_no_bos":
              "completeness score, no BOS errors"}
    for name in SCORE_NAMES:
        mean, median = scores["mean"][name], scores["median"][name]
        shown = [f"{v:>7.4f}" if v is not None else f"{'n/a':>7}" for v in (mean, median)]
        lines.append(f"{labels[name]:35}{shown[0]}  {shown[1]}")
    lines.append("(no BOS errors: the BOS position's error nodes left out, as circuit-tracer scores)")
    return "\n".join(lines)


__all__ = ["DEFAULT_PROMPTS", "SCORE_NAMES", "encode_prompts", "format_prompt_scores", "load_prompts", "prompt_set_scores"]
