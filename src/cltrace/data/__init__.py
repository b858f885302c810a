"""Text sources, the offline default corpus, and packing text into token batches."""

from cltrace.data.default_corpus import (
    COMPONENTS,
    CorpusComponent,
    DefaultCorpusSource,
    install_default_corpus,
)
from cltrace.data.packing import (
    PackConfig,
    PackedBatch,
    PackPosition,
    heldout_score,
    hf_tokenize,
    is_heldout,
    pack_batches,
    split_documents,
)
from cltrace.data.sources import (
    FileSource,
    HFDatasetSource,
    TextSource,
    open_text_source,
    parse_hf_spec,
)

__all__ = [
    "COMPONENTS",
    "CorpusComponent",
    "DefaultCorpusSource",
    "FileSource",
    "HFDatasetSource",
    "PackConfig",
    "PackPosition",
    "PackedBatch",
    "TextSource",
    "heldout_score",
    "hf_tokenize",
    "install_default_corpus",
    "is_heldout",
    "open_text_source",
    "pack_batches",
    "parse_hf_spec",
    "split_documents",
]
