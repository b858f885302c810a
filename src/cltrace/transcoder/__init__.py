"""Transcoders: cross-layer (CLT) and per-layer (PLT), their activations, and their file formats."""

from cltrace.transcoder.activation import Activation, JumpReLU, ReLU, TopK, make_activation
from cltrace.transcoder.config import TranscoderConfig
from cltrace.transcoder.formats import detect_format, load_transcoder, save_transcoder
from cltrace.transcoder.transcoder import (
    CrossLayerTranscoder,
    PerLayerTranscoder,
    SparseActivations,
    Transcoder,
    make_transcoder,
)

__all__ = [
    "Activation",
    "CrossLayerTranscoder",
    "JumpReLU",
    "PerLayerTranscoder",
    "ReLU",
    "SparseActivations",
    "TopK",
    "Transcoder",
    "TranscoderConfig",
    "detect_format",
    "load_transcoder",
    "make_activation",
    "make_transcoder",
    "save_transcoder",
]
