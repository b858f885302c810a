"""The command line's intervention notation, ``LAYER:FEATURE[@POS]=VALUE|xFACTOR``, and range checks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cltrace.errors import CltraceError
from cltrace.notation import NAME, NotationError, is_feature, parse_feature, split_assignment
from cltrace.notation import parse_positions as positions_of
from cltrace.replacement.intervention import MAX_VALUE, Intervention
from cltrace.replacement.supernodes import Supernode

SPEC_HELP = "expected LAYER:FEATURE[@POS]=VALUE or LAYER:FEATURE[@POS]=xFACTOR (POS: 4, 2-5 or 2-), e.g. 5:123@4=0 or 5:123=x2"


def _bad(spec: str, why: str) -> CltraceError:
    return CltraceError(f"malformed --set {spec!r}: {why}; {SPEC_HELP}")


def parse_positions(spec: str, text: str | None) -> tuple[int | None, int | None]:
    """(start, end) of the POS text of `spec`: "4" → (4, 4), "2-5" → (2, 5), "2-" → (2, None), None → (None, None)."""
    try:
        return positions_of(text)
    except NotationError as exc:
        raise _bad(spec, str(exc)) from None


def parse_intervention(spec: str, supernodes: Mapping[str, Supernode] | None = None) -> list[Intervention]:
    """Parse ``LAYER:FEATURE[@POS]=VALUE|xFACTOR`` (or ``SUPERNODE[@POS]=...``) into interventions.

    A supernode name expands to one intervention per member; a member's own position wins over
    ``@POS``, which applies to members given without one. One-line CltraceErrors for malformed specs.
    """
    try:
        target, pos_text, val_text = split_assignment(spec)
    except NotationError as exc:
        raise _bad(spec, str(exc)) from None
    if val_text.lower().startswith(("x", "*")):
        try:
            number = float(val_text[1:])
        except ValueError:
            raise _bad(spec, f"factor {val_text[1:]!r} is not a number") from None
        value, factor = None, number
    else:
        try:
            number = float(val_text)
        except ValueError:
            raise _bad(spec, f"value {val_text!r} is not a number (write xF to multiply by F)") from None
        value, factor = number, None
    if not math.isfinite(number):
        raise _bad(spec, f"{val_text!r} is not a finite number")
    if abs(number) > MAX_VALUE:
        raise _bad(spec, f"{val_text!r} is beyond ±{MAX_VALUE:g}")
    start, end = parse_positions(spec, pos_text)
    if is_feature(target):
        try:
            layer, feature = parse_feature(target)
        except NotationError as exc:
            raise _bad(spec, str(exc)) from None
        return [Intervention(layer, feature, value, factor, start, end)]
    if not NAME.match(target):
        raise _bad(spec, f"{target!r} is neither LAYER:FEATURE nor a supernode name")
    if not supernodes or target not in supernodes:
        known = ", ".join(sorted(supernodes)) if supernodes else "none loaded"
        raise CltraceError(
            f"--set {spec!r}: no supernode named {target!r} (known: {known}); define it in a supernodes file "
            "(--supernodes FILE) or write LAYER:FEATURE"
        )
    return supernodes[target].interventions(value=value, factor=factor, start=start, end=end)


def check_interventions(
    interventions: Sequence[Intervention], n_layers: int, n_features: int, n_prompt: int | None
) -> None:
    """One-line CltraceError for a layer or feature out of range or a position beyond the prompt.

    `n_prompt` None: the prompt's length is not known yet (the command line checks layers and
    features before loading the model); positions are then checked on the next call, with it.
    """
    for iv in interventions:
        if not 0 <= iv.layer < n_layers:
            raise CltraceError(
                f"intervention {iv}: layer {iv.layer} is out of range: the transcoder has layers 0..{n_layers - 1}"
            )
        if not 0 <= iv.feature < n_features:
            raise CltraceError(
                f"intervention {iv}: feature {iv.feature} is out of range: layer {iv.layer} has features 0..{n_features - 1}"
            )
        if n_prompt is None:
            continue
        if iv.start is not None and iv.start >= n_prompt:
            raise CltraceError(
                f"intervention {iv}: position {iv.start} is beyond the prompt ({n_prompt} tokens, positions 0..{n_prompt - 1})"
            )
        if iv.end is not None and iv.end >= n_prompt:
            raise CltraceError(
                f"intervention {iv}: position {iv.end} is beyond the prompt ({n_prompt} tokens, positions "
                f"0..{n_prompt - 1}); write {iv.start}- for a range that also covers generated tokens"
            )


__all__ = ["SPEC_HELP", "check_interventions", "parse_intervention", "parse_positions"]
