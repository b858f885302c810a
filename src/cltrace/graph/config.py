"""How an attribution graph is computed: `AttributionConfig`, whose fields carry their own defaults,
bounds and help text (the command line and the server read them from here). Light to import: no model
stack (transformers), so that `cltrace --help` stays fast."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cltrace.errors import CltraceError
from cltrace.fields import check_bounds
from cltrace.resources import available_device_memory_bytes, available_memory_bytes


@dataclass
class AttributionConfig:
    """How an attribution graph is computed."""

    max_feature_nodes: int = dataclasses.field(default=7500, metadata={"min": 0})
    """At most this many feature nodes (rows); active features beyond it are left out of the graph
    and their effect goes into the targets' constant terms."""

    batch_size: int = dataclasses.field(default=32, metadata={"min": 1})
    """Target rows per backward pass (copies of the prompt in the one batched forward): memory
    grows with it as batch × positions × layers × d_model."""

    max_n_logits: int = 10
    """With no targets given: at most this many logit targets."""

    desired_logit_prob: float = 0.95
    """With no targets given: the most probable tokens until their cumulative probability reaches this."""

    update_interval: int = 4
    """Feature rows are chosen in rounds of update_interval × batch_size, re-estimating every
    feature's influence on the logits between rounds."""

    progress: bool = True
    """Show a progress bar (tqdm, on stderr)."""

    decoder_cache_bytes: int = 1 << 30
    """Keep the active features' decoders, padded per group of positions and slot, up to this many
    bytes, lowest slots first; the rest are gathered from a table of the active ones on each pass,
    which costs time on a CPU. Fewer are kept where the graph would not fit in the memory allowed
    otherwise."""

    pass_memory_bytes: int = 2 << 30
    """The batched frozen forward and one backward pass are kept under about this many bytes: on long
    prompts the batch shrinks below batch_size (memory per copy grows with positions × layers × d_model).
    At 1,024 tokens on the default model that is 15 copies: 30 took 20% more time a row and all the
    memory that 15 leave free."""

    max_memory_bytes: int | None = None
    """Refuse, before computing anything, a graph whose estimated peak memory is above this (None: the
    memory available when the graph starts: the GPU's when it runs on one, else what the kernel says)."""

    recompute_rows: bool | None = None
    """Keep the visited rows in bfloat16 for the influence ordering only and compute the graph's
    edges again, exactly, in a second pass (about twice the backward work, a quarter of the row
    memory with half the bytes per entry and only the graph's columns kept). None: only when fp32
    rows would not fit in the memory limit (long prompts)."""

    def validate(self) -> None:
        """Raise CltraceError naming the first impossible value."""
        out_of_bounds = check_bounds(self)  # the fields' own bounds, shared with the CLI and the server
        checks = [
            (out_of_bounds is None, out_of_bounds or ""),
            (isinstance(self.max_n_logits, int) and self.max_n_logits >= 1, "max_n_logits must be an integer >= 1"),
            (0 < self.desired_logit_prob <= 1, "desired_logit_prob must be in (0, 1]"),
            (isinstance(self.update_interval, int) and self.update_interval >= 1, "update_interval must be an integer >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CltraceError(f"attribution config: {message}")

    def memory_limit(self, device: torch.device | None = None) -> int | None:
        """The bytes a graph may take: max_memory_bytes, else what is available now on `device` (a CUDA
        GPU's memory; the host's for the CPU or None), None where unknown."""
        if self.max_memory_bytes is not None:
            return self.max_memory_bytes
        if device is not None and device.type == "cuda":
            return available_device_memory_bytes(device)
        return available_memory_bytes()


@dataclass
class PromptSetConfig:
    """Which prompts of a prompt set are attributed for its mean scores (`cltrace.graph.prompt_scores`)."""

    max_prompts: int = dataclasses.field(default=16, metadata={"min": 1})
    """Attribute at most this many prompts, the file's first (each costs a full attribution graph)."""

    max_prompt_tokens: int = dataclasses.field(default=64, metadata={"min": 2})
    """A prompt of more tokens than this (BOS included) is refused before any graph is computed: a
    graph's time grows with its length."""

    def validate(self) -> None:
        """Raise CltraceError naming the first impossible value."""
        out_of_bounds = check_bounds(self)
        if out_of_bounds is not None:
            raise CltraceError(f"prompt set config: {out_of_bounds}")


@dataclass
class GroupingConfig:
    """How a graph's feature nodes are grouped into supernodes by role (`cltrace.graph.grouping`)."""

    node_threshold: float = dataclasses.field(default=0.6, metadata={"min": 0.0, "max": 1.0})
    """The features grouped (the circuit's candidates) are those of the graph pruned to this share
    of the influence on the logits (pruning's node threshold; the full graph's picture keeps 0.8)."""

    threshold: float = dataclasses.field(default=0.5, metadata={"min": -1.0, "max": 1.0})
    """Two groups merge while their average role similarity (a weighted mean of cosines, -1 to 1)
    is at least this: higher keeps more, smaller supernodes."""

    max_layer_gap: int = dataclasses.field(default=3, metadata={"min": 0})
    """Two groups merge only when all their members are at most this many layers apart."""

    output_weight: float = dataclasses.field(default=0.6, metadata={"min": 0.0, "max": 1.0})
    """The weight of output similarity (where each feature's effect on the target flows) against
    input similarity (where its activation comes from); the rest goes to inputs."""


@dataclass
class CircuitConfig:
    """How the circuit is chosen from a graph's supernodes (`cltrace.graph.circuit`)."""

    max_supernodes: int = dataclasses.field(default=12, metadata={"min": 1})
    """At most this many supernodes in the circuit."""

    min_coverage: float = dataclasses.field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """The circuit is the smallest set of supernodes whose |signed effects| on the target make up this
    share of all supernodes' (at most max_supernodes of them)."""

    core_share: float = dataclasses.field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    """Each circuit supernode keeps only its core: its strongest members (by their contribution to
    its effect) that make up this share of their summed |contribution| (1: every member)."""

    min_edge_share: float = dataclasses.field(default=0.02, metadata={"min": 0.0, "max": 1.0})
    """Edges weaker than this share of the circuit's strongest edge are left out."""

    max_token_edges: int = dataclasses.field(default=3, metadata={"min": 0})
    """Each supernode keeps at most this many edges from the prompt's tokens, its strongest."""

    label_members: int = dataclasses.field(default=2, metadata={"min": 0})
    """For each circuit supernode, this many of its members (the strongest first) have their output
    labels measured by steering, where the feature store has none yet, before it is validated."""


@dataclass
class ValidationConfig:
    """How a circuit is checked by intervening on the model (`cltrace.graph.validate`)."""

    n_random: int = dataclasses.field(default=3, metadata={"min": 1})
    """Draws of activation-matched random active features the circuit's ablation is compared with."""

    seed: int = dataclasses.field(default=0, metadata={"min": 0})
    """Seed of the random draws."""

    steer_factor: float = dataclasses.field(default=3.0, metadata={"min": 0.0})
    """A supernode whose label names tokens is steered by multiplying its members by this."""


def resolve_config(config: AttributionConfig | None, **overrides: object) -> AttributionConfig:
    """A validated copy of `config` (default: AttributionConfig()) with the overrides that are not None."""
    cfg = dataclasses.replace(config) if config is not None else AttributionConfig()
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.validate()
    return cfg


__all__ = ["AttributionConfig", "CircuitConfig", "GroupingConfig", "PromptSetConfig", "ValidationConfig", "resolve_config"]
