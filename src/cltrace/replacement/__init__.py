"""The local replacement model: the original model with its MLPs replaced by a transcoder."""

from cltrace.replacement.replacement_model import FrozenOutput, ReplacementModel, ReplacementRun

__all__ = ["FrozenOutput", "ReplacementModel", "ReplacementRun"]
