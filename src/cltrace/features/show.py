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


def format_page(page: FeaturePage, n_top: int = 10, n_samples: int = 2, activations: bool = True) -> str:
    """The page as text: label, statistics, what it says, what drives it, and its contexts."""
    lines = [f"feature {page.name}  {page.display_label}"]
    if page.label:
        lines.append(f"  auto label: {page.auto_label}")
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
