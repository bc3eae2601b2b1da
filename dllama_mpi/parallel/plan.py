"""The partition plan: a pure function of (model spec, budgets) -> every rank's slices.

No MPI here. Every slice used anywhere (loader, kernels' buffers, KV cache, tests)
comes from a Plan; no other module does slice arithmetic.

Splits (query heads by largest-remainder apportionment; rows by rounding each rank's
cumulative share to a granule, see _spans):
  q heads  granule 1 head   -> wq rows, attention, the gathered attention vector
  kv heads follow q heads: a rank computes and caches every KV head any of its query
           heads reads, so a KV head is duplicated only where its group is split
  dim      granule 32 rows  -> wo and w2 rows (model-dim outputs)
  ffn      granule 32 rows  -> w1/w3 rows (hidden outputs, w2's gathered input); in a mixture of
           experts, the same rows of every expert (any routing keeps each rank's share of the work)
  vocab    granule 32 rows  -> classifier and embedding rows
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass

from ..model.quant import ACTIVATION_TYPE, ACTIVATIONS, BLOCK, DEFAULT_KV_TYPE, K_QUANTS, KV_TYPES, Q80, Q80_ACTIVATIONS
from ..model.spec import ModelSpec

ROW_GRANULE = 32
Span = tuple[int, int]  # [start, stop)


def apportion(n_units: int, budgets: tuple[int, ...]) -> list[int]:
    """Split n_units whole units proportionally to budgets (Hamilton's largest remainder).

    Exact integer arithmetic; ties in the remainder go to the lower rank."""
    total = sum(budgets)
    quotas = [n_units * b // total for b in budgets]
    remainders = [n_units * b % total for b in budgets]
    order = sorted(range(len(budgets)), key=lambda r: (-remainders[r], r))
    for r in order[: n_units - sum(quotas)]:
        quotas[r] += 1
    return quotas


def _spans(n: int, granule: int, budgets: tuple[int, ...]) -> tuple[Span, ...]:
    """Contiguous spans over n rows in whole granules (only the span holding row n - 1 may
    end short). Each boundary is the rank's cumulative share of n rounded to the nearest
    granule, so every span is within one granule of its share even when n is not a whole
    number of granules (apportioning whole granules alone can leave one rank a short
    last granule: 1 row where 48 were due)."""
    total, cumulative, spans, start = sum(budgets), 0, [], 0
    for b in budgets:
        cumulative += b
        nearest = granule * ((2 * n * cumulative + granule * total) // (2 * granule * total))
        stop = n if cumulative == total else min(n, nearest)
        spans.append((start, stop))
        start = stop
    return tuple(spans)


def _head_spans(n_heads: int, budgets: tuple[int, ...]):
    start = 0
    for count in apportion(n_heads, budgets):
        yield start, start + count
        start += count


@dataclass(frozen=True)
class RankSlices:
    rank: int
    budget: int
    q_heads: Span
    kv_heads: Span
    dim_rows: Span
    ffn_rows: Span
    vocab_rows: Span

    @property
    def n_local_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class Traffic:
    """Per decoded token, for a plan and buffer type (prefill sends the same per token, in
    fewer, larger messages).

    collectives: 4 Allgatherv per layer (att, dim, ffn, dim), the embeddings' Allreduce
        (Comm.combine_rows) and the logits' Gatherv (a mixture of experts gathers the hidden values of each token's
        n_experts_used experts as its ffn vector: the same collectives).
    payload[r]: bytes rank r hands to those collectives: its parts of the gathered vectors,
        its logits (ranks > 0), and the embedding row (each rank hands the whole row, zero
        where another rank holds the token).
        The engine counts the same quantity (Comm.bytes_sent).
    gathered: bytes of the Allgatherv'd vectors in full (every rank ends up with all of it).
    wire: bytes that must cross between ranks in all, whatever the algorithm: each
        gathered byte and the embedding row reach the n - 1 ranks without them, each
        rank's logits reach rank 0. MPI headers and TCP/IP framing come on top."""

    collectives: int
    payload: tuple[float, ...]
    gathered: int
    wire: int


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    budgets: tuple[int, ...]
    ranks: tuple[RankSlices, ...]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    # --- rows of each tensor kind ------------------------------------------------
    def rows(self, kind: str, rank: int) -> Span:
        """Rows of matrix `kind` held by `rank` (its output elements)."""
        s, hd = self.ranks[rank], self.spec.head_dim
        if kind == "wq":
            return s.q_heads[0] * hd, s.q_heads[1] * hd
        if kind in ("wk", "wv"):
            return s.kv_heads[0] * hd, s.kv_heads[1] * hd
        if kind in ("wo", "w2"):
            return s.dim_rows
        if kind in ("w1", "w3"):
            return s.ffn_rows
        if kind in ("tok_embeddings", "output"):
            return s.vocab_rows
        raise KeyError(kind)

    # --- vectors gathered across ranks -------------------------------------------
    def segments(self, vector: str) -> tuple[Span, ...]:
        """Each rank's span of a gathered vector: 'att' (head outputs), 'dim', 'ffn', 'vocab'."""
        kind = {"att": "wq", "dim": "wo", "ffn": "w1", "vocab": "output"}[vector]
        return tuple(self.rows(kind, r) for r in range(self.world_size))

    def activation_forms(self, vector: str, buffer_type: str) -> frozenset[str]:
        """The forms of a full-width activation its products take (see activation_forms)."""
        return activation_forms(self.spec, vector, buffer_type)

    def q80_aligned(self, vector: str) -> bool:
        """Whether a gathered vector can travel as Q80 blocks for every split (see q80_aligned)."""
        return q80_aligned(self.spec, vector)

    def travels_q80(self, vector: str, buffer_type: str) -> bool:
        """Whether a gathered vector travels as Q80 blocks, else as f32 (see travels_q80)."""
        return travels_q80(self.spec, vector, buffer_type)

    def transit_bytes(self, vector: str, buffer_type: str, rank: int) -> int:
        """Bytes of `rank`'s part of a gathered vector, one token, as it travels."""
        a, b = self.segments(vector)[rank]
        return (b - a) // BLOCK * Q80.itemsize if self.travels_q80(vector, buffer_type) else 4 * (b - a)

    def traffic(self, buffer_type: str) -> Traffic:
        """What crosses between ranks per decoded token (see Traffic)."""
        n, spec = self.world_size, self.spec
        # a mixture of experts gathers each token's hidden values of every expert it uses
        per_layer = [sum(self.transit_bytes(v, buffer_type, r) * (spec.n_experts_used if v == "ffn" and spec.moe else 1)
                         for v in ("att", "dim", "ffn", "dim")) for r in range(n)]
        logits = [0] + [4 * _count(s.vocab_rows) for s in self.ranks[1:]]  # Gatherv to rank 0, as f32
        embedding = 4 * spec.dim  # the token's row, from the rank holding it, OR-combined
        payload = tuple(spec.n_layers * per_layer[r] + logits[r] + embedding for r in range(n))
        gathered = spec.n_layers * sum(per_layer)
        return Traffic(
            collectives=0 if n == 1 else 4 * spec.n_layers + 2,
            payload=payload if n > 1 else (0.0,),
            gathered=gathered if n > 1 else 0,
            wire=(n - 1) * (gathered + embedding) + sum(logits),
        )

    def owner_of_vocab_row(self, token: int) -> int:
        for s in self.ranks:
            if s.vocab_rows[0] <= token < s.vocab_rows[1]:
                return s.rank
        raise IndexError(f"token {token} outside vocabulary of {self.spec.vocab_size}")

    def kv_head_of(self, rank: int) -> tuple[int, ...]:
        """For each local query head of `rank`, the local index of the KV head it reads."""
        s, g = self.ranks[rank], self.spec.group_size
        return tuple(h // g - s.kv_heads[0] for h in range(*s.q_heads))

    # --- memory -------------------------------------------------------------------
    def weight_bytes(self, rank: int) -> int:
        spec = self.spec
        rows = {k: self.rows(k, rank)[1] - self.rows(k, rank)[0] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
        vectors = 2 * 4 * spec.dim
        if spec.qkv_bias:
            vectors += 4 * (rows["wq"] + rows["wk"] + rows["wv"])
        if spec.qk_norm:
            vectors += 2 * 4 * spec.head_dim
        if spec.moe:  # every expert's share of rows, and the replicated router
            rows.update({k: spec.n_experts * rows[k] for k in ("w1", "w2", "w3")})
            vectors += 4 * spec.n_experts * spec.dim
        layers = sum(n * spec.resident_row_bytes(k, layer) for layer in range(spec.n_layers) for k, n in rows.items())
        vocab = self.rows("output", rank)
        per_row = spec.resident_row_bytes("tok_embeddings") + (0 if spec.shared_classifier else spec.resident_row_bytes("output"))
        tables = (vocab[1] - vocab[0]) * per_row
        return layers + spec.n_layers * vectors + tables + 4 * spec.dim

    def expert_layer_bytes(self, rank: int) -> int:
        """The largest layer's experts as `rank` holds them (0 for a dense model): loading holds
        one layer's experts twice while it packs them (weights._stack_experts)."""
        spec = self.spec
        if not spec.moe:
            return 0
        rows = {k: self.rows(k, rank)[1] - self.rows(k, rank)[0] for k in ("w1", "w2", "w3")}
        return max(spec.n_experts * sum(n * spec.resident_row_bytes(k, layer) for k, n in rows.items())
                   for layer in range(spec.n_layers))

    def kv_cache_bytes(self, rank: int, max_seq_len: int, kv_type: str) -> int:
        """One slot's KV cache on `rank`: a key and a value row of each own KV head, at every
        layer and position, in `kv_type` (quant.KV_TYPES)."""
        s = self.ranks[rank]
        row = KV_TYPES[kv_type].row_bytes(self.spec.head_dim)
        return 2 * self.spec.n_layers * max_seq_len * s.n_local_kv_heads * row

    def plan_hash(self) -> str:
        doc = {"spec": self.spec.to_attrs(), "budgets": self.budgets,
               "ranks": [vars(s) for s in self.ranks]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def table(self, max_seq_len: int, n_slots: int = 1, kv_type: str = DEFAULT_KV_TYPE) -> str:
        """The plan as a text table, one line per rank; its KV column holds every slot's cache
        (a server's n_slots sequences) in `kv_type`, as a rank's need does, and its header says
        both. (The converter's --info, which knows no launch, shows the default type.)"""
        total = sum(self.budgets)
        kv_head = f"kv MiB {kv_type}" + (f" ({n_slots} slots)" if n_slots > 1 else "")
        kv_width = max(8, len(kv_head))
        head = (f"{'rank':>4} {'budget':>6} {'share':>6} {'heads':>7} {'kv':>5} {'dim rows':>9} "
                f"{'ffn rows':>9} {'vocab rows':>11} {'weights MiB':>11} {kv_head:>{kv_width}}")
        lines = [head]
        for s in self.ranks:
            lines.append(
                f"{s.rank:>4} {s.budget:>6} {s.budget / total:>6.1%} {_count(s.q_heads):>7} "
                f"{_count(s.kv_heads):>5} {_count(s.dim_rows):>9} {_count(s.ffn_rows):>9} "
                f"{_count(s.vocab_rows):>11} {self.weight_bytes(s.rank) / 2**20:>11.2f} "
                f"{n_slots * self.kv_cache_bytes(s.rank, max_seq_len, kv_type) / 2**20:>{kv_width}.2f}"
            )
        if self.spec.moe:
            spec = self.spec
            lines.append(f"experts: each rank holds its ffn rows (of {spec.hidden_dim}) of each of the {spec.n_experts} "
                         f"experts' w1/w3 and its dim rows of their w2, and the {spec.n_experts} x {spec.dim} router; "
                         f"a token uses {spec.n_experts_used} experts")
        return "\n".join(lines)


# the matrices each full-width activation multiplies: the normed input of a layer's two halves and of
# the classifier ("output": the embedding table where the model shares it), the gathered attention
# and hidden vectors; "dim" (wo's and w2's output) is only added to the residual stream
FEEDS = {"xb": ("wq", "wk", "wv", "w1", "w3", "output"), "att": ("wo",), "ffn": ("w2",), "dim": ()}


def activation_forms(spec: ModelSpec, vector: str, buffer_type: str) -> frozenset[str]:
    """The forms of activation `vector` its products take besides plain f32 (engine.Activations):
    with q80 buffers the 8-bit form of each quantized type it multiplies ("q80" and/or "q8k",
    quant.ACTIVATION_TYPE), with f32 buffers "f32" (packed) where any is quantized."""
    kinds = ["tok_embeddings" if k == "output" and spec.shared_classifier else k for k in FEEDS[vector]]
    types = {spec.tensor_type(k, layer) for k in kinds for layer in range(spec.n_layers)}
    quantized = types & set(ACTIVATION_TYPE)
    if buffer_type == Q80_ACTIVATIONS.name:
        return frozenset(ACTIVATION_TYPE[t] for t in quantized)
    return frozenset(("f32",) if quantized else ())


def q80_aligned(spec: ModelSpec, vector: str) -> bool:
    """Whether a gathered vector can travel as Q80 blocks for every split: its granule and
    length must be whole blocks, or a split would cut a block (and change its scale)."""
    granule, length = {
        "att": (spec.head_dim, spec.q_dim),
        "dim": (ROW_GRANULE, spec.dim),
        "ffn": (ROW_GRANULE, spec.hidden_dim),
    }[vector]
    return granule % BLOCK == 0 and length % BLOCK == 0


def travels_q80(spec: ModelSpec, vector: str, buffer_type: str) -> bool:
    """Whether a gathered vector travels as Q80 blocks (each rank quantizes its own part), else
    as f32: with q80 buffers where it is q80_aligned, except in a model with k-quant weights
    (a GGUF's), which keeps llama.cpp's arithmetic: a vector a k-quant product takes arrives
    whole, for its Q8K scale of 256 values, and the residual's increments ("dim") stay exact
    (quantized, they alone moved a Q4_K_M model's log-probabilities measurably away from
    llama.cpp's: docs/architecture.md, "Numerics and bit-identity")."""
    if buffer_type != Q80_ACTIVATIONS.name or not q80_aligned(spec, vector):
        return False
    if vector == "dim":
        return not spec.weight_types() & set(K_QUANTS)
    return all(ACTIVATIONS[form].block_values == BLOCK for form in activation_forms(spec, vector, buffer_type))


def _count(span: Span) -> int:
    return span[1] - span[0]


def make_plan(spec: ModelSpec, budgets) -> Plan:
    """The partition plan for `spec` over len(budgets) ranks; budgets are positive integer
    ratios (what the user typed is parsed in budgets.py)."""
    if not budgets or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in budgets):
        raise ValueError(f"a plan needs positive integer ratios, got {budgets!r}")
    budgets = tuple(int(b) for b in budgets)
    common = math.gcd(*budgets)
    budgets = tuple(b // common for b in budgets)  # only ratios matter: 12 4 is 3 1
    q = tuple(_head_spans(spec.n_heads, budgets))
    dim = _spans(spec.dim, ROW_GRANULE, budgets)
    ffn = _spans(spec.hidden_dim, ROW_GRANULE, budgets)
    vocab = _spans(spec.vocab_size, ROW_GRANULE, budgets)
    g = spec.group_size
    ranks = []
    for r, b in enumerate(budgets):
        q0, q1 = q[r]
        kv = (q0 // g, -(-q1 // g)) if q1 > q0 else (q0 // g, q0 // g)
        ranks.append(RankSlices(r, b, q[r], kv, dim[r], ffn[r], vocab[r]))
    return Plan(spec, budgets, tuple(ranks))
