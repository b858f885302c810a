"""The typed notations (LAYER:FEATURE, TARGET[@POS]=VALUE, positions, names) parse one way everywhere:
the command line's `features show`, `intervene --set` and the server's sidecar labels share one parser."""

from __future__ import annotations

import pytest
from helpers.cli import assert_one_line_error, run_cli

from cltrace.errors import CltraceError
from cltrace.features.show import parse_feature as show_feature
from cltrace.notation import (
    NAME,
    NotationError,
    format_feature,
    is_feature,
    parse_feature,
    parse_positions,
    split_assignment,
    split_setting,
)
from cltrace.replacement.interventions import parse_intervention
from cltrace.train.config import parse_override


@pytest.mark.parametrize("layer,feature", [(0, 0), (3, 117), (29, 16383)])
def test_feature_round_trip(layer: int, feature: int) -> None:
    text = format_feature(layer, feature)
    assert text == f"{layer}:{feature}" and is_feature(text)
    assert parse_feature(text) == parse_feature(f" {layer} / {feature} ") == (layer, feature)
    assert show_feature(text) == (layer, feature)
    (iv,) = parse_intervention(f"{text}@2=x3")
    assert (iv.layer, iv.feature, iv.factor, iv.start, iv.end) == (layer, feature, 3.0, 2, 2)


@pytest.mark.parametrize("text,why", [("3", "not LAYER:FEATURE"), ("a:1", "layer 'a'"), ("1:-2", "feature '-2'"),
                                      ("1:2:3", "feature '2:3'"), (":5", "layer ''")])
def test_bad_features_name_the_wrong_part(text: str, why: str) -> None:
    with pytest.raises(NotationError, match=why):
        parse_feature(text)
    with pytest.raises(CltraceError, match="is not a feature: write LAYER:FEATURE"):
        show_feature(text)


def test_assignment_positions_and_names() -> None:
    assert split_assignment(" 5:123 @ 4 = x2 ") == ("5:123", "4", "x2")
    assert split_assignment("lr=1e-4") == ("lr", None, "1e-4")
    with pytest.raises(NotationError, match="TARGET\\[@POS\\]=VALUE"):
        split_assignment("5:123")
    assert [parse_positions(t) for t in (None, "4", "2-5", "2-")] == [(None, None), (4, 4), (2, 5), (2, None)]
    with pytest.raises(NotationError, match="empty"):
        parse_positions("5-2")
    assert NAME.match("say_DA.v2-b") and not NAME.match("3:117") and not is_feature("say_DA")


def test_the_cli_reports_bad_notation_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("features", "show", "3-117", "--db", "missing.db", capsys=capsys)
    assert_one_line_error(code, err, "'3-117' is not a feature", "LAYER:FEATURE")
    code, _, err = run_cli("intervene", "The cat", "-t", "nowhere", "--set", "3:x=0", capsys=capsys)
    assert_one_line_error(code, err, "malformed --set '3:x=0'", "feature 'x' is not a non-negative integer")


def test_one_set_grammar_for_training_and_interventions() -> None:
    """`train --set` and `intervene --set` both split KEY=VALUE at the first '='; an intervention's key
    carries @POS and its value is one word."""
    assert split_setting(" n-features =64") == ("n-features", "64") and parse_override(" n-features =64") == ("n_features", 64)
    assert split_setting("source=a=b.txt") == ("source", "a=b.txt") and parse_override("source=a=b.txt") == ("source", "a=b.txt")
    for text, why in [("lr", "must look like KEY=VALUE"), (" =3", "has no key before '='")]:
        with pytest.raises(NotationError, match=why):
            split_setting(text)
        with pytest.raises(CltraceError, match=f"override {text!r} {why}"):
            parse_override(text)
        with pytest.raises(CltraceError, match="does not have the form TARGET"):
            parse_intervention(text)
    assert split_assignment("3:7@2-=x0.5") == ("3:7", "2-", "x0.5")
    for text in ("3:7=1 2", "3 7=1", "@2=1", "3:7="):
        with pytest.raises(NotationError, match="does not have the form"):
            split_assignment(text)
