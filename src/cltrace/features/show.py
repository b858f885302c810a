"""A feature page as readable terminal text."""

from __future__ import annotations

from cltrace import notation
from cltrace.errors import CltraceError
from cltrace.features.page import Example, FeaturePage, TokenScore, _printable
from cltrace.notation import NotationError


def parse_feature(text: str) -> tuple[int, int]:
    """"LAYER:FEATURE" (e.g. "3:117") as (layer, feature); CltraceError otherwise."""
    try:
        return notation.parse_feature(text)
    except NotationError:
        raise CltraceError(f"{text!r} is not a feature: write LAYER:FEATURE, e.g. 3:117") from None


def _tokens(scores: list[TokenScore]) -> str:
    return "  ".join(f"{_printable(s.text)!r} {s.score:+.2f}" for s in scores) or "-"


def _example_line(ex: Example, width: int = 100) -> str:
    text = ex.render()
    if len(text) > width:  # keep the marked token in view
        at = text.index("«")
        start = max(0, min(at - width // 2, len(text) - width))
        text = ("…" if start else "") + text[start : start + width] + ("…" if start + width < len(text) else "")
    return f"{ex.act:8.3f}  {text}"


def _act_line(ex: Example) -> str:
    cells = [
        f"{'«' if i == ex.mark else ''}{_printable(t)}{'»' if i == ex.mark else ''}={a:.2f}"
        for i, (t, a) in enumerate(zip(ex.texts, ex.acts))
        if a > 0
    ]
    return "          active: " + " ".join(cells)


def _sparkline(counts: list[int], edges: list[float]) -> str:
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return "-"
    lo, hi = nz[0], nz[-1]
    bars = " ▁▂▃▄▅▆▇█"
    peak = max(counts)
    line = "".join(bars[max(1, min(8, round(8 * c / peak)))] if c else " " for c in counts[lo : hi + 1])

    def edge(i: int) -> str:
        return "0" if i == 0 else f"{edges[min(i, len(edges)) - 1]:.3g}"

    return f"{edge(lo)} {line} {edges[min(hi, len(edges) - 1)]:.3g}"


def _score(value: float | None, fmt: str) -> str:
    return "not measured" if value is None else format(value, fmt)


def _tok_list(items: list[dict], key: str, fmt: str) -> str:
    return "  ".join(f"{_printable(d['text'])!r} {format(d[key], fmt)}" for d in items) or "-"


def measured_lines(measured: dict) -> list[str]:
    """The measured label of a page as text: its parts, scores, and the evidence behind each."""
    ie, oe = measured.get("input_evidence", {}), measured.get("output_evidence", {})
    held = ie.get("heldout", {})
    mark = {True: "unclear", False: "confident"}
    lines = [
        f"  input label:  {measured['input_label'] or '-'}  [{mark[measured['input_unclear']]}; held-out balanced "
        f"accuracy {_score(measured['input_score'], '.3f')}, {held.get('positives', 0)} active tokens, "
        f"TPR {_score(held.get('tpr'), '.2f')}, FPR random {_score(held.get('fpr_random'), '.3f')}, "
        f"FPR nearby {_score(held.get('fpr_near'), '.2f')}]",
        f"  output label: {measured['output_label'] or '-'}  [{mark[measured['output_unclear']]}; steering z "
        f"{_score(measured['output_score'], '.2f')}]",
    ]
    if ie.get("description"):
        lines.append(f"  description:  {ie['description']}  [from the describer, not scored]")
    if oe.get("effect"):
        lines.append(f"    direct effect (z): {_tok_list(oe['effect'][:6], 'z', '.1f')}")
    if oe.get("data"):
        lines.append(f"    next in data (share): {_tok_list(oe['data'], 'share', '.2f')}")
    for s in oe.get("steer", []):
        lines.append(f"    steered z {s['z']:+.2f} at {s['context'][-60:]}  raised: {_tok_list(s['raised'][:3], 'z', '.1f')}")
    return lines


def format_page(page: FeaturePage, n_top: int = 10, n_samples: int = 2, activations: bool = True) -> str:
    """The page as text: label, statistics, what it says, what drives it, and its contexts."""
    lines = [f"feature {page.name}  {page.display_label}"]
    if page.measured:
        lines.extend(measured_lines(page.measured))
    if page.label or page.measured:
        lines.append(f"  token-list label: {page.auto_label}")
    lines.append(
        f"  density {100 * page.density:.4f}% ({page.count:,} of {page.tokens_analysed:,} tokens)  "
        f"max {page.max_act:.3f}  mean {page.mean_act:.3f}"
    )
    lines.append(f"  activations: {_sparkline(page.hist_counts, page.hist_edges)}")
    lines.append(f"  promotes:    {_tokens(page.promoted)}")
    lines.append(f"  suppresses:  {_tokens(page.suppressed)}")
    lines.append(f"  read from:   {_tokens(page.inputs)}")
    if page.count == 0:
        lines.append("  never active in the analysed tokens")
        return "\n".join(lines)
    lines.append(f"  top contexts ({min(n_top, len(page.top))} of {len(page.top)}):")
    for ex in page.top[:n_top]:
        lines.append(_example_line(ex))
        if activations:
            lines.append(_act_line(ex))
    if page.samples and n_samples:
        bands = sorted({e.band for e in page.samples if e.band is not None}, reverse=True)  # every sample has one
        lines.append(f"  sampled contexts by activation quantile band (of {len(bands)}):")
        for band in bands:
            for ex in [e for e in page.samples if e.band == band][-n_samples:]:
                lines.append(f"    q{band} " + _example_line(ex).lstrip())
    return "\n".join(lines)
