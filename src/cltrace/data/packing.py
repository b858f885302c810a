"""Packing documents into fixed-length token contexts, with a stable held-out split and exact resume.

The token stream of a split is the concatenation, over the source's documents in order that belong
to the split, of ``tokenize(doc) + [sep_id]`` (no separator when ``sep_id`` is ``None``). It is cut
into consecutive pieces of ``n_ctx - 1`` tokens and each piece is prefixed with ``bos_id``, so every
context is ``[bos, t_0, ..., t_{n_ctx-2}]`` and a long document simply continues, after a fresh BOS,
in the next context. A final piece shorter than ``n_ctx - 1`` tokens is dropped (never padded).

Held-out split: a document is held out when a salted hash of its *text* falls below
``heldout_fraction``. It depends on nothing but the text, so it is stable across runs, machines,
source order and resumption, and duplicate documents always land on the same side.

Resume: every yielded :class:`PackedBatch` carries the :class:`PackPosition` just after its last
context: the index (in the source's own document order, counting documents of both splits) of the
first document not fully consumed, and how many of its tokens (separator included) were consumed.
``pack_batches(..., start=position)`` continues with exactly the batches an uninterrupted stream
would have yielded next.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, NamedTuple

import torch

from cltrace.errors import CltraceError

Tokenize = Callable[[str], Sequence[int]]
Split = Literal["train", "heldout"]


@dataclass
class PackConfig:
    """How documents become ``[batch, n_ctx]`` token batches."""

    n_ctx: int
    """Tokens per context, BOS included (at least 2)."""
    batch_size: int
    """Contexts per batch."""
    bos_id: int
    """Token id put at the start of every context (the model's BOS / attention sink)."""
    sep_id: int | None = None
    """Token id appended after every document (e.g. EOS); ``None`` for no separator."""
    split: Split = "train"
    """Which side of the held-out split to stream."""
    heldout_fraction: float = 0.01
    """Share of documents (by text hash) held out from training, in [0, 1)."""
    split_seed: int = 0
    """Salt of the held-out hash: change it to draw a different held-out set."""
    drop_last: bool = True
    """Drop a final batch with fewer than ``batch_size`` contexts (else yield it smaller)."""
    mix_contexts: int = 1
    """Pack this many contexts ahead and yield them in a shuffled order (1: in stream order). Documents
    are long (a 64-context batch of the default corpus holds 2 to 20 of them), so consecutive
    contexts share a subject; mixing makes every batch draw from across the pool."""

    def __post_init__(self) -> None:
        if self.n_ctx < 2:
            raise CltraceError(f"n_ctx must be at least 2 (BOS plus one token), not {self.n_ctx}")
        if self.batch_size < 1:
            raise CltraceError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.mix_contexts < 1 or (self.mix_contexts > 1 and self.mix_contexts % self.batch_size):
            raise CltraceError(
                f"mix_contexts must be 1 or a multiple of batch_size={self.batch_size}, not {self.mix_contexts}"
            )
        if self.split not in ("train", "heldout"):
            raise CltraceError(f"split must be 'train' or 'heldout', not {self.split!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise CltraceError(f"heldout_fraction must be in [0, 1), not {self.heldout_fraction}")
        if self.split == "heldout" and self.heldout_fraction == 0.0:
            raise CltraceError(
                "split='heldout' with heldout_fraction=0 holds no documents; set heldout_fraction > 0"
            )

    def stream_key(self) -> str:
        """Identifies the token stream; a resume position is only valid for the same key.

        ``batch_size`` and ``drop_last`` are not part of it: positions fall on context boundaries,
        so a run may resume with another batch size. ``mix_contexts`` is (when above 1): it sets
        the order of the contexts.
        """
        mix = f";mix={self.mix_contexts}" if self.mix_contexts > 1 else ""
        return (
            f"n_ctx={self.n_ctx};bos={self.bos_id};sep={self.sep_id};split={self.split};"
            f"heldout={self.heldout_fraction!r};seed={self.split_seed}{mix}"
        )


@dataclass(frozen=True)
class PackPosition:
    """Where a packed stream stands, to save in a checkpoint and resume from."""

    doc_index: int = 0
    """Index, in the source's document order (both splits counted), of the first document whose
    tokens are not all consumed."""
    token_offset: int = 0
    """Tokens of that document (its separator included) already consumed."""
    contexts: int = 0
    """Contexts yielded so far (tokens seen = contexts * n_ctx)."""
    stream_key: str = ""
    """``PackConfig.stream_key()`` of the stream; empty matches any (a fresh start)."""
    pool_offset: int = 0
    """With ``mix_contexts`` > 1: contexts of the current pool already yielded. The fields above
    then give the pool's start, from which a resume packs the pool again (so the contexts yielded
    so far are ``contexts`` + ``pool_offset``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackPosition:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                doc_index=int(d["doc_index"]),
                token_offset=int(d["token_offset"]),
                contexts=int(d.get("contexts", 0)),
                stream_key=str(d.get("stream_key", "")),
                pool_offset=int(d.get("pool_offset", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CltraceError(
                f"bad saved data position {d!r}; it needs integer doc_index and token_offset"
            ) from e


class PackedBatch(NamedTuple):
    """One batch and the position just after it."""

    tokens: torch.Tensor
    """LongTensor [batch, n_ctx]; column 0 is BOS."""
    position: PackPosition
    """Resume here to continue with the next batch."""


def heldout_score(text: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by ``text`` and ``seed`` (salted BLAKE2b)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def is_heldout(text: str, fraction: float, seed: int = 0) -> bool:
    """Whether ``text`` belongs to the held-out split of size ``fraction``."""
    return heldout_score(text, seed) < fraction


def split_documents(
    docs: Iterable[str], split: Split, fraction: float, seed: int = 0
) -> Iterator[str]:
    """The documents of ``docs`` that fall in ``split`` (``"train"`` or ``"heldout"``)."""
    want_heldout = split == "heldout"
    for doc in docs:
        if is_heldout(doc, fraction, seed) == want_heldout:
            yield doc


def hf_tokenize(tokenizer: Any) -> Tokenize:
    """Wrap a Hugging Face tokenizer as ``text -> ids`` with no special tokens added.

    Packing adds BOS and separators itself, so the tokenizer must not add its own.
    """

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tokenize


def model_packing(
    loaded: Any,
    n_ctx: int,
    batch_size: int,
    *,
    tokenize: Tokenize | None = None,
    bos_id: int | None = None,
    sep_id: int | None = None,
    **pack_options: Any,
) -> tuple[Tokenize, PackConfig]:
    """The tokenizer and packing settings of a model (a `LoadedModel`): its tokenizer without special
    tokens, its BOS rule (`loaded.bos_id()`) and its EOS as the document separator.

    `tokenize`, `bos_id` and `sep_id` override the model's (a tiny test model has no tokenizer);
    `pack_options` go to `PackConfig` (split, heldout_fraction, split_seed, drop_last).
    """
    if tokenize is None:
        if loaded.tokenizer is None:
            raise CltraceError(f"model '{loaded.name}' has no tokenizer: pass tokenize or token ids")
        tokenize = hf_tokenize(loaded.tokenizer)
    if bos_id is None:
        bos_id = loaded.bos_id()
    if bos_id is None:
        raise CltraceError(f"model '{loaded.name}' has no BOS or EOS token to start contexts with: pass bos_id")
    if sep_id is None and loaded.tokenizer is not None:
        sep_id = loaded.tokenizer.eos_token_id
    return tokenize, PackConfig(n_ctx=n_ctx, batch_size=batch_size, bos_id=bos_id, sep_id=sep_id, **pack_options)


@dataclass
class _Cursor:
    """Packing state: where the last *completed* context ended."""

    doc_index: int
    token_offset: int
    contexts: int
    rows: list[list[int]] = field(default_factory=list)


def pack_batches(
    source: Iterable[str],
    tokenize: Tokenize,
    config: PackConfig,
    start: PackPosition | None = None,
) -> Iterator[PackedBatch]:
    """Yield ``[batch, n_ctx]`` token batches of one split of ``source``.

    Args:
        source: documents in a fixed order; it is read from the beginning (documents before
            ``start.doc_index`` are skipped without tokenizing), so it must give the same order
            on every pass (all :mod:`cltrace.data.sources` do).
        tokenize: ``text -> token ids`` with no special tokens (see :func:`hf_tokenize`).
        config: context length, batch size, BOS/separator ids and split.
        start: a position from a previous run's :class:`PackedBatch`; ``None`` starts afresh.

    Yields:
        :class:`PackedBatch` items: ``tokens`` LongTensor [batch, n_ctx] and the resume position.
        With ``config.mix_contexts`` > 1 the contexts come in pools of that many, each pool in
        an order drawn from its start (see :func:`_mixed_batches`).

    Raises:
        CltraceError: ``start`` was saved for a different stream (other n_ctx, ids, split or
            mixing), or a fresh stream could not fill a single context (or batch).
    """
    start = start or PackPosition()
    key = config.stream_key()
    if start.stream_key and start.stream_key != key:
        raise CltraceError(
            f"saved data position belongs to another stream ({start.stream_key}), not this one "
            f"({key}); resume with the same packing settings or start afresh"
        )
    if start.doc_index < 0 or start.token_offset < 0 or start.pool_offset < 0:
        raise CltraceError(f"bad data position {start}; indices must be >= 0")
    if config.mix_contexts > 1:
        return _mixed_batches(source, tokenize, config, start)
    return _batches_in_order(source, tokenize, config, start)


def _batches_in_order(source: Iterable[str], tokenize: Tokenize, config: PackConfig, start: PackPosition) -> Iterator[PackedBatch]:
    """`pack_batches` in stream order (the position already checked)."""
    key = config.stream_key()
    body = config.n_ctx - 1  # tokens after BOS in each context
    fresh = start.doc_index == 0 and start.token_offset == 0 and start.contexts == 0
    want_heldout = config.split == "heldout"
    cur = _Cursor(start.doc_index, start.token_offset, start.contexts)
    piece: list[int] = []  # tokens of the context being filled, BOS not yet added
    yielded = False

    def position() -> PackPosition:
        return PackPosition(cur.doc_index, cur.token_offset, cur.contexts, key)

    for idx, text in enumerate(source):
        if idx < start.doc_index:
            continue
        if is_heldout(text, config.heldout_fraction, config.split_seed) != want_heldout:
            continue
        toks = list(tokenize(text))
        if not toks:
            continue  # nothing to pack, not even a separator
        if config.sep_id is not None:
            toks.append(config.sep_id)
        pos = start.token_offset if idx == start.doc_index else 0
        if pos > len(toks):
            raise CltraceError(
                f"saved data position {start} points past the end of document {idx} "
                f"({len(toks)} tokens); the source or tokenizer changed since it was saved"
            )
        while pos < len(toks):
            take = min(body - len(piece), len(toks) - pos)
            piece.extend(toks[pos : pos + take])
            pos += take
            if len(piece) == body:
                cur.rows.append([config.bos_id, *piece])
                piece = []
                cur.contexts += 1
                # the context ends inside this document, or exactly at its end
                cur.doc_index, cur.token_offset = (idx, pos) if pos < len(toks) else (idx + 1, 0)
                if len(cur.rows) == config.batch_size:
                    yielded = True
                    yield PackedBatch(torch.tensor(cur.rows, dtype=torch.long), position())
                    cur.rows = []

    if cur.rows and not config.drop_last:
        yielded = True
        yield PackedBatch(torch.tensor(cur.rows, dtype=torch.long), position())
    # a fresh stream that yields nothing is a configuration problem, never a silent no-op
    if fresh and not yielded:
        if cur.rows:
            raise CltraceError(
                f"the '{config.split}' split of this source fills only {len(cur.rows)} context(s), "
                f"fewer than batch_size={config.batch_size}; use more text, a smaller batch_size, "
                "or drop_last=False"
            )
        raise CltraceError(
            f"the '{config.split}' split of this source has fewer than {body} tokens, not enough "
            f"for one context of n_ctx={config.n_ctx}; use more text, a smaller n_ctx, or another "
            "heldout_fraction"
        )


def _mixed_batches(source: Iterable[str], tokenize: Tokenize, config: PackConfig, start: PackPosition) -> Iterator[PackedBatch]:
    """`pack_batches` with mixing: pools of `mix_contexts` contexts packed in stream order, each
    yielded in a random order seeded by the pool's start, so a resume that packs the pool again
    draws the same order and skips the `pool_offset` contexts already yielded."""
    key = config.stream_key()
    one_by_one = replace(config, batch_size=1, drop_last=False, mix_contexts=1)  # the same stream, in order
    pool_start = PackPosition(start.doc_index, start.token_offset, start.contexts, one_by_one.stream_key())
    skip = start.pool_offset
    fresh = start.doc_index == 0 and start.token_offset == 0 and start.contexts == 0 and skip == 0
    contexts = _batches_in_order(source, tokenize, one_by_one, pool_start)
    yielded = False
    while pool := list(itertools.islice(contexts, config.mix_contexts)):  # one context per item
        if skip > len(pool):
            raise CltraceError(
                f"saved data position {start} points past the end of its pool of {len(pool)} contexts; "
                "the source or tokenizer changed since it was saved"
            )
        g = torch.Generator().manual_seed(config.split_seed * 1_000_003 + pool_start.contexts)
        rows = torch.cat([b.tokens for b in pool])[torch.randperm(len(pool), generator=g)]  # [pool, n_ctx]
        end = pool[-1].position
        for i in range(skip, len(pool), config.batch_size):
            j = min(i + config.batch_size, len(pool))
            if j - i < config.batch_size and config.drop_last:
                break
            after = (PackPosition(end.doc_index, end.token_offset, end.contexts, key) if j == len(pool) else
                     PackPosition(pool_start.doc_index, pool_start.token_offset, pool_start.contexts, key, pool_offset=j))
            yielded = True
            yield PackedBatch(rows[i:j], after)
        skip = 0
        pool_start = end
        if len(pool) < config.mix_contexts:
            break
    if fresh and not yielded:
        raise CltraceError(
            f"the '{config.split}' split of this source fills fewer than batch_size={config.batch_size} contexts; "
            "use more text, a smaller batch_size, or drop_last=False"
        )
