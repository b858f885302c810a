"""cltrace: cross-layer transcoders, attribution graphs and interventions for language models."""

__version__ = "0.1.0"
