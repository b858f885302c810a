"""Loading language models and running them with frozen attention and norms."""

from cltrace.model.adapters import ADAPTERS, Adapter, adapter_for
from cltrace.model.freeze import FreezeState, freeze
from cltrace.model.load import DEFAULT_MODEL, LoadedModel, cache_dir, load_model, wrap_model

__all__ = [
    "ADAPTERS", "Adapter", "adapter_for", "FreezeState", "freeze",
    "DEFAULT_MODEL", "LoadedModel", "cache_dir", "load_model", "wrap_model",
]
