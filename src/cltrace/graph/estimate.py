"""What building an attribution graph will take: peak memory and time, estimated before any row is computed.

The figures come from the prompt's forward run alone; `cltrace attribute --dry-run` prints them, and
`attribute` refuses a graph whose estimated peak is above the memory limit before it starts.
`_Estimating` is the part of `cltrace.graph.attribution._Attribution` that makes the estimate.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from cltrace.device import synchronize
from cltrace.errors import CltraceError
from cltrace.graph.state import _AttributionState

#: Memory of the batched forward and one backward pass, per row of the batch, in [pos, layer, d_model]
#: fp32 tensors: the forward keeps neither its inputs nor its resid_mid outputs.
_COPIES_PER_ROW = 2

#: The share of a row's graph columns that hold an edge at 100 tokens or fewer; longer prompts have
#: relatively fewer (see _edge_density).
_EDGE_DENSITY = 0.3


def _edge_density(n_tokens: int) -> float:
    """The expected share of a row's graph columns holding an edge (see _EDGE_DENSITY)."""
    return _EDGE_DENSITY * min(1.0, (100 / max(n_tokens, 1)) ** 0.3)


#: Resident memory of the interpreter with torch and transformers imported.
_RUNTIME_BYTES = 350 * 2**20


@dataclass(frozen=True)
class AttributionEstimate:
    """What building one graph is expected to take (see `estimate_attribution`)."""

    n_tokens: int
    n_active_features: int
    n_feature_rows: int
    n_logit_rows: int
    n_batches: int
    batch_size: int
    peak_bytes: int
    """Estimated peak memory of the whole process, model included, on its device (see `device`)."""
    flops: float
    """Floating-point work of the passes and products (see `seconds`)."""
    overhead_s: float
    """Time spent besides the floating-point work (a fixed cost per pass)."""
    decoders_cached: bool
    recompute_rows: bool = False
    """Whether the rows are kept in bfloat16 and the graph's edges computed again (long prompts)."""
    row_bytes: int = 0
    """Of peak_bytes, the rows kept between passes."""
    device: str = "cpu"
    """Where the graph is computed: peak_bytes is that device's memory (a GPU's, or the host's), and
    seconds come from its measured matrix-product rate."""

    @property
    def seconds(self) -> float:
        """Estimated time of the attribution itself (model loading not included), at this machine's
        matrix-product rate (measured on first use: building a graph needs only the memory figures)."""
        return self.flops / (_ACHIEVED_RATE * _matmul_rate(self.device)) + self.overhead_s

    def summary(self) -> str:
        """One line: tokens, active features, rows, time and memory."""
        where = "GPU memory" if self.device.startswith("cuda") else "memory"
        return (
            f"{self.n_tokens} tokens, {self.n_active_features} active features, {self.n_feature_rows} feature rows + "
            f"{self.n_logit_rows} logit rows in {self.n_batches} passes of {self.batch_size}: about "
            f"{_duration(self.seconds)} and {self.peak_bytes / 2**30:.2f} GB peak {where}"
            + (" (rows kept in bf16, edges computed in a second pass)" if self.recompute_rows else "")
        )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


#: The share of the square matrix-product rate that the passes achieve: the backward's products are
#: smaller than square ones, and the decoder gathers take time of their own.
_ACHIEVED_RATE = 0.4


@functools.cache
def _matmul_rate(device: str = "cpu") -> float:
    """The fp32 matrix-product rate of `device` in FLOP/s, measured once per device (about 0.1 s)."""
    dev = torch.device(device)
    size = 512 if dev.type == "cpu" else 4096  # a GPU needs large products to be measured at its pace
    a = torch.randn(size, size, device=dev)
    torch.mm(a, a)
    synchronize(dev)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.1:
        torch.mm(a, a)
        n += 1
        synchronize(dev)
    return 2 * size**3 * n / (time.perf_counter() - t0)


class _Estimating(_AttributionState):
    """The estimate of one graph's computation (mixed into `cltrace.graph.attribution._Attribution`)."""

    @property
    def _heads(self) -> int:
        mcfg = self.model.config
        return getattr(mcfg, "num_attention_heads", None) or mcfg.n_head  # GPT-2 names it n_head

    @functools.cached_property
    def _weight_bytes(self) -> int:
        """The model's and the transcoder's parameters, held throughout."""
        return sum(t.numel() * t.element_size() for t in (*self.model.model.parameters(), *self.tc.parameters()))

    def _refuse_long_prompt(self) -> None:
        """Refuse a prompt whose forward run alone would not fit, before running it: the run keeps
        every layer's attention pattern ([heads, pos, pos] each), the transcoder's pre-activations and
        activations ([pos, layer, features] each) and four [pos, layer, d_model] tensors."""
        if self.limit is None:
            return
        P, L, d, F = int(self.ids.numel()), self.tc.config.n_layers, self.tc.config.d_model, self.tc.config.n_features
        need = 4 * (L * self._heads * P * P + 2 * P * L * F + 4 * P * L * d + P * self.model.vocab_size)
        params = self._weight_bytes
        if params + need > self.limit:
            raise CltraceError(
                f"a prompt of {P} tokens needs at least {(params + need) / 2**30:.1f} GB for its forward run alone "
                f"(attention patterns grow with tokens squared), more than the {self.limit / 2**30:.1f} GB "
                "allowed: shorten the prompt or raise --max-memory"
            )

    def _batch_size(self, n_feature_rows: int) -> int:
        """Copies in the batched forward: batch_size, fewer on long prompts (pass_memory_bytes)."""
        per_copy = _COPIES_PER_ROW * self.n_pos * self.n_layers * self.d * 4
        fits = max(1, self.cfg.pass_memory_bytes // per_copy)
        return min(self.cfg.batch_size, fits, max(len(self.targets), n_feature_rows, 1))

    def estimate(self, recompute: bool | None = None) -> AttributionEstimate:
        """What building the graph will take, from the prompt's run alone (nothing else computed).

        `recompute`: estimate with the rows in bfloat16 and a second, exact pass (True), in fp32 (False),
        or as `build` will choose (None: the config's recompute_rows, else the second pass only when
        fp32 rows would not fit in the memory limit).

        Peak memory counts what is held at once: the runtime, the model and transcoder, the prompt's
        run (activations, frozen attention patterns), and the larger of two phases. While rows are
        computed: the batched frozen forward kept for the backward passes, one pass's gradients, the
        decoders (cached or one slot's gathered) and the kept rows (dense over their layer's prefix of
        the columns; the visited rows taken to have the layers of the active features on average).
        Then their conversion into the graph's COO edges (28 bytes an edge while laid out, a share of
        each row's graph columns nonzero that falls on long prompts: `_edge_density`) beside the rows (fp32) or the forward (bf16 rows,
        computed again). Time: the floating-point
        work of the forward and backward passes and of the edge products, at this machine's measured
        matrix-product rate.
        """
        if recompute is None:
            recompute = self.cfg.recompute_rows
        if recompute is None:
            fp32 = self.estimate(recompute=False)
            return fp32 if self.limit is None or fp32.peak_bytes <= self.limit else self.estimate(recompute=True)
        cfg, L, P, d = self.cfg, self.n_layers, self.n_pos, self.d
        n_feature_rows = min(cfg.max_feature_nodes, self.n_act)
        n_rows = len(self.targets) + n_feature_rows
        batch = self._batch_size(n_feature_rows)
        n_batches = -(-len(self.targets) // batch) + -(-n_feature_rows // batch)
        params = self._weight_bytes
        run = self.run
        run_bytes = sum(t.numel() * t.element_size() for t in (
            run.logits, run.resid_mid, run.mlp_out, run.pre_activations, run.activations, run.reconstruction, run.error,
            *run.freeze_state.patterns.values(), *run.freeze_state.norm_scales.values(),
        ))
        # What autograd keeps of the batched forward, one pass's gradients and the forward's
        # transients: about _COPIES_PER_ROW [batch, pos, layer, d] fp32 tensors.
        passes = _COPIES_PER_ROW * batch * P * L * d * 4
        backward = 2 * batch * self.n_cols * 4 + batch * (P * self.max_rank + 1) * 4  # a pass's rows and their prefixes
        tables = sum(x.table.numel() * 4 for x in self.slots if x is not None)
        widest = max((x.uncached_bytes() for x in self.slots if x is not None), default=0)
        decoders = tables + self.cached_decoder_bytes + 2 * widest
        mean_width = (
            sum(self._width(layer) * (self.n_below[layer + 1] - self.n_below[layer]) for layer in range(L)) / self.n_act
            if self.n_act else 0.0
        )
        entries = len(self.targets) * self._width(L) + n_feature_rows * mean_width
        rows = int(entries * (2 if recompute else 4))
        # The graph's edges: 20 bytes an edge in the graph, 8 more while they are laid out.
        kept = 28 * int(_edge_density(P) * n_rows * (n_feature_rows + L * P + P))
        base = _RUNTIME_BYTES + params + run_bytes
        work = passes + backward + decoders
        if recompute:  # bf16 rows are all freed before the second pass, which needs the forward again
            peak = base + work + max(rows, kept)
        else:  # the forward and decoders are freed before the fp32 rows become edges (each block freed once read)
            peak = base + rows + max(work, kept)
        # Work: per pass the frozen backward (attention OV and output projections, pattern products)
        # over about half the layers, then the edge products with every active feature's decoders.
        mcfg, heads = self.model.config, self._heads
        kv = (getattr(mcfg, "num_key_value_heads", None) or heads) * d // heads
        layer_flops = 2 * batch * P * (d * d + d * kv) + 2 * batch * P * P * d
        pass_flops = layer_flops * L / 2 + 2 * batch * self.decoder_cache_bytes / 4  # padded slot decoders
        all_batches = n_batches * (2 if recompute else 1)
        flops = all_batches * pass_flops + 2 * layer_flops * L
        return AttributionEstimate(
            n_tokens=P, n_active_features=self.n_act, n_feature_rows=n_feature_rows, n_logit_rows=len(self.targets),
            n_batches=n_batches, batch_size=batch, peak_bytes=int(peak), flops=float(flops), overhead_s=0.02 * all_batches,
            decoders_cached=self.cached_decoder_bytes == self.decoder_cache_bytes, recompute_rows=bool(recompute), row_bytes=rows, device=str(self.device),
        )
