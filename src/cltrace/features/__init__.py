"""Feature pages: what each transcoder feature means, stored in one SQLite file per transcoder."""

from cltrace.features.build import (
    BuildParams,
    build_feature_store,
    transcoder_fingerprint,
)
from cltrace.features.labels import FeatureLabel, LabelConfig
from cltrace.features.store import (
    Example,
    FeaturePage,
    FeatureStore,
    Labeller,
    TokenLabeller,
    TokenScore,
)
from cltrace.features.views import token_views

__all__ = [
    "BuildParams",
    "Example",
    "FeatureLabel",
    "FeaturePage",
    "FeatureStore",
    "LabelConfig",
    "Labeller",
    "TokenLabeller",
    "TokenScore",
    "build_feature_store",
    "token_views",
    "transcoder_fingerprint",
]
