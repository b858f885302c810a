"""Training transcoders: config, losses, the trainer and the end-to-end `train_transcoder`."""

from cltrace.train.config import PRESETS, TrainConfig, parse_override, preset
from cltrace.train.losses import transcoder_loss
from cltrace.train.run import train_transcoder
from cltrace.train.trainer import Trainer, TrainingDiverged, fold_normalisation

__all__ = [
    "PRESETS", "TrainConfig", "Trainer", "TrainingDiverged", "fold_normalisation", "parse_override", "preset",
    "train_transcoder", "transcoder_loss",
]
