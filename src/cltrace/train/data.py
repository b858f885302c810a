"""Where training activations come from: shuffle buffers of (x, y) with exact resume positions.

An :class:`ActivationSource` yields *buffers*: (x, y) each [tokens, n_layers, d_model] with the
position to resume from to get the *next* buffer. The trainer shuffles each buffer token-wise with
a generator seeded by (seed, buffer index) and cuts it into steps, so a run resumed from a buffer's
start position, buffer index and step count sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from cltrace.data.harvest import Harvester
from cltrace.data.packing import PackPosition, model_packing, pack_batches
from cltrace.data.store import ActivationStore, model_fingerprint
from cltrace.errors import CltraceError
from cltrace.model.load import LoadedModel

log = logging.getLogger(__name__)

Buffer = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


class ActivationSource(ABC):
    """A resumable stream of (x, y) buffers."""

    n_layers: int
    d_model: int

    @abstractmethod
    def buffers(self, start: dict[str, Any] | None) -> Iterator[Buffer]:
        """Yield (x, y, position after this buffer), starting at `start` (None: the beginning)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the activations (the model): a checkpoint only resumes on an equal one."""


class HarvestSource(ActivationSource):
    """Text → packed contexts → model → (x, y), one shuffle buffer of `buffer_contexts` contexts at a time.

    With `mix_contexts` > 1 the contexts are packed that many ahead (rounded up to whole buffers) and
    shuffled before harvest (see `PackConfig.mix_contexts`).

    The text source is re-read from the start when it runs out (an epoch); the position records
    the epoch and the packing position. The buffers are on `out_device` (the trainer's, so that a GPU
    trains on activations that never leave it).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        source: Iterable[str],
        tokenize: Callable[[str], Sequence[int]],
        n_ctx: int,
        buffer_contexts: int,
        harvest_batch: int = 16,
        heldout_fraction: float = 0.01,
        split_seed: int = 0,
        split: str = "train",
        bos_id: int | None = None,
        sep_id: int | None = None,
        dtype: torch.dtype = torch.float32,
        autocast_bf16: bool = False,
        mix_contexts: int = 1,
        out_device: torch.device | str = "cpu",
    ) -> None:
        self.loaded = loaded
        self.source = source
        self.tokenize = tokenize
        self.harvester = Harvester(loaded, dtype=dtype, max_batch=harvest_batch, autocast_bf16=autocast_bf16,
                                   out_device=out_device)
        self.n_layers = loaded.n_layers
        self.d_model = loaded.d_model
        _, self.pack = model_packing(
            loaded, n_ctx, buffer_contexts, tokenize=tokenize, bos_id=bos_id, sep_id=sep_id, split=split,
            heldout_fraction=heldout_fraction, split_seed=split_seed,
            mix_contexts=1 if mix_contexts <= 1 else -(-mix_contexts // buffer_contexts) * buffer_contexts,
        )

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint(self.loaded)

    def token_batches(self, start: dict[str, Any] | None = None, epochs: bool = True) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """[buffer_contexts, n_ctx] token batches with the position after each."""
        epoch = int(start.get("epoch", 0)) if start else 0
        pos = PackPosition.from_dict(start["pack"]) if start else None
        while True:
            got = False
            for batch in pack_batches(self.source, self.tokenize, self.pack, start=pos):
                got = True
                yield batch.tokens, {"epoch": epoch, "pack": batch.position.to_dict()}
            if not epochs:
                return
            if not got and pos is None:  # pragma: no cover - pack_batches raises on an empty fresh stream
                raise CltraceError("the text source gave no training contexts; give more text")
            epoch += 1
            pos = None
            log.warning("text source exhausted: starting epoch %d over the same text", epoch + 1)

    def buffers(self, start: dict[str, Any] | None) -> Iterator[Buffer]:
        for tokens, position in self.token_batches(start):
            x, y = self.harvester.harvest(tokens)
            yield x, y, position


class StoreSource(ActivationSource):
    """An activation store (`cltrace harvest`) → shuffle buffers of `buffer_contexts` contexts.

    Buffers are the store's contexts in order, `buffer_contexts` at a time, exactly the buffers a
    `HarvestSource` with the same packing yields (in the store's dtype). When `total_tokens`
    outlasts the store, reading goes on from its start (another epoch): context i of the stream is
    context i mod contexts of the store. The position after a buffer is the number of contexts
    consumed, with the store's id and size, so a resumed run refuses a store that was replaced or
    changed since its checkpoint.
    """

    def __init__(self, store: ActivationStore | str, buffer_contexts: int, verify: bool = True) -> None:
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.buffer_contexts = buffer_contexts
        self.verify = verify
        self.n_layers = self.store.n_layers
        self.d_model = self.store.d_model
        if not self.store.complete:
            m = self.store.manifest
            raise CltraceError(
                f"activation store '{self.store.path}' is incomplete ({m['tokens']:,} of {m['target_tokens']:,} tokens): "
                "finish it by running the same `cltrace harvest` command again"
            )
        if self.store.contexts < buffer_contexts:
            raise CltraceError(
                f"activation store '{self.store.path}' holds {self.store.contexts} contexts, fewer than one shuffle buffer "
                f"of shuffle_contexts={buffer_contexts}; harvest more tokens or lower shuffle_contexts"
            )

    def fingerprint(self) -> dict[str, Any]:
        return self.store.fingerprint

    def buffers(self, start: dict[str, Any] | None) -> Iterator[Buffer]:
        store = self.store
        context = 0
        if start is not None:
            if start.get("store_id") != store.store_id or start.get("store_contexts") != store.contexts:
                raise CltraceError(
                    f"activation store '{store.path}' changed since this run's checkpoint (it was harvested again or "
                    "extended); resume with the store as it was, or start a new run"
                )
            context = int(start["context"])
        epoch = context // store.contexts
        while True:
            if context // store.contexts != epoch:
                epoch = context // store.contexts
                log.warning("activation store exhausted: starting epoch %d over the same activations", epoch + 1)
            x, y = store.read_contexts(context, self.buffer_contexts, verify=self.verify)  # [tokens, L, d] each
            context += self.buffer_contexts
            yield x, y, {"context": context, "store_id": store.store_id, "store_contexts": store.contexts}


__all__ = ["ActivationSource", "Buffer", "HarvestSource", "StoreSource", "model_fingerprint"]
