"""Run state and the forward pass of one rank, one step at a time. A step is a Batch of T
rows, each a token of some sequence at some position: a chunk of one sequence's prompt
and/or one decoding token per active sequence. Rows of different sequences share each pass
over the weights; attention reads each row's own KV slot. A row's result never depends on
the other rows of its step (every kernel computes row by row in a fixed order).

Every buffer and the KV cache (n_slots sequences of max_seq_len tokens) are allocated once
in Engine.__init__; a step allocates nothing. Per layer (x replicated on every rank):

  x -> rmsnorm -> own q/k/v rows (one stacked product) -> rope -> causal attention over own KV cache
    -> Allgatherv(att) -> own wo rows -> Allgatherv(dim) -> x += ;
  x -> rmsnorm -> own w1/w3 rows (stacked) -> silu*mul -> Allgatherv(ffn) -> own w2 rows
    -> Allgatherv(dim) -> x +=
then own classifier rows for the rows that want logits -> Gatherv(logits) to rank 0. Before
the layers, each row's embedding comes from the rank holding its token's row, all rows of the
step in one collective (Comm.combine_rows).
In a mixture of experts the FFN half routes each row to its experts and runs own rows of each
(experts_ffn), with the same two collectives.
"""

from __future__ import annotations

import time

import numpy as np

from ..kernels import qmatmul, resolve, vector
from ..model import quant
from ..parallel import threads
from ..parallel.comm import Comm
from ..parallel.plan import Plan
from .weights import Experts, LocalWeights, Matrix, Parts

F32 = np.float32
BLOCK, GROUP = qmatmul.BLOCK, qmatmul.GROUP


def _count(span: tuple[int, int]) -> int:
    return span[1] - span[0]


class Activations:
    """A full-width activation of up to t_max tokens, identical on every rank, with the forms
    its quantized products take (plan.activation_forms) whenever the width is whole blocks:
    with q80 buffers each 8-bit form of quant.ACTIVATIONS its weights take, packed (q80: Q40/Q80
    weights, packed from the Q80 blocks that also travel; q8k: the k-quants); with f32 buffers
    "f32", packed f32. See qmatmul."""

    def __init__(self, n: int, t_max: int, forms: frozenset[str]):
        self.n = n
        self.f32 = np.zeros((t_max, n), F32)  # (T, n)
        nb = n // BLOCK if n % BLOCK == 0 else 0
        g = qmatmul.groups(nb)
        self.q80 = quant.Q80_ACTIVATIONS.name in forms and nb > 0
        self.packs_f32 = quant.F32_TYPE.name in forms and nb > 0
        self.blocks = np.zeros((t_max, nb if self.q80 else 0, 34), np.uint8)  # Q80 as it travels
        # 8-bit forms: codes xq (T, 512 G) i8, their block sums xsum and block scales xd (T, 16 G);
        # padding blocks stay zero: only this width is ever packed here
        self.codes8 = {form: (np.zeros((t_max, 512 * g), np.int8), np.zeros((t_max, GROUP * g), np.int32),
                              np.zeros((t_max, GROUP * g), F32)) for form in quant.ACTIVATIONS if form in forms and nb}
        self.xt = np.zeros((t_max, 512 * g if self.packs_f32 else 0), F32)

    def prepare(self, n_tok: int) -> None:
        """Derive the product forms of f32[:n_tok] (after the values are final)."""
        if self.q80:
            vector.quantize_q80(self.f32[:n_tok], self.blocks[:n_tok])
            self.pack(n_tok)
        for form, codes in self.codes8.items():
            if pack := quant.ACTIVATIONS[form].pack:  # else packed from the blocks (above)
                resolve(pack)(self.f32[:n_tok], *(a[:n_tok] for a in codes))
        if self.packs_f32:
            qmatmul.pack_f32(self.f32[:n_tok], self.xt[:n_tok])

    def pack(self, n_tok: int) -> None:
        qmatmul.pack_q80(self.blocks[:n_tok], *(a[:n_tok] for a in self.codes8[quant.Q80_ACTIVATIONS.name]))

    def take_rows(self, source: Activations, rows: np.ndarray) -> None:
        """Rows `rows` of source's values and product forms into this one's first len(rows)
        (every (row, choice) pair's input row, in routing order). mode="clip": the rows are
        valid, and "raise" buffers."""
        n = len(rows)
        np.take(source.f32, rows, axis=0, out=self.f32[:n], mode="clip")
        for form, codes in self.codes8.items():
            for mine, theirs in zip(codes, source.codes8[form], strict=True):
                np.take(theirs, rows, axis=0, out=mine[:n], mode="clip")
        if self.packs_f32:
            np.take(source.xt, rows, axis=0, out=self.xt[:n], mode="clip")


class GatheredActivations(Activations):
    """An activation each rank computes a column span of (`local`), then Allgatherv'd: as Q80
    blocks when the plan says every split falls on block boundaries, else as f32. In transit
    each rank's part for all T tokens is contiguous (rank-major); it is unpacked into
    (T, n) on arrival."""

    def __init__(self, comm: Comm, plan: Plan, name: str, n: int, t_max: int, buffer_type: str):
        super().__init__(n, t_max, plan.activation_forms(name, buffer_type))
        self.comm, self.spans = comm, plan.segments(name)
        a, b = self.spans[comm.rank]
        self.local = np.zeros((t_max, b - a), F32)  # (T, own columns): the rank's output
        self.travels_q80 = plan.travels_q80(name, buffer_type)
        if self.travels_q80 and not self.q80:  # blocks to arrive in, for a vector no product takes
            self.blocks = np.zeros((t_max, n // BLOCK, 34), np.uint8)
        unit = BLOCK if self.travels_q80 else 1
        self._units = [((s // unit), (e // unit)) for s, e in self.spans]  # blocks or values
        width = 34 if self.travels_q80 else 1
        self._transit = np.zeros(t_max * (n // unit) * width, np.uint8 if self.travels_q80 else F32)
        self._plans: dict[int, tuple] = {}
        self._plan_for(1)  # decoding's, made now: the per-token path allocates nothing

    def _plan_for(self, n_tok: int):
        """Views of each rank's part in transit and the Allgatherv for blocks of n_tok tokens."""
        if n_tok not in self._plans:
            width = 34 if self.travels_q80 else 1
            parts = []
            for s, e in self._units:
                part = self._transit[n_tok * s * width : n_tok * e * width]
                parts.append(part.reshape(n_tok, e - s, 34) if self.travels_q80 else part.reshape(n_tok, e - s))
            spans = tuple((n_tok * s * width, n_tok * e * width) for s, e in self._units)
            self._plans[n_tok] = (parts, self.comm.gatherer(self._transit[: n_tok * self._units[-1][1] * width], spans))
        return self._plans[n_tok]

    def gather(self, n_tok: int) -> None:
        parts, allgather = self._plan_for(n_tok)
        mine = parts[self.comm.rank]
        if self.travels_q80:
            vector.quantize_q80(self.local[:n_tok], mine)
        else:
            mine[...] = self.local[:n_tok]
        allgather()
        for (s, e), part in zip(self._units, parts):
            if self.travels_q80:
                self.blocks[:n_tok, s:e] = part
            else:
                self.f32[:n_tok, s:e] = part
        if self.travels_q80:  # (plan.travels_q80: then no product takes Q8K)
            if self.q80:
                self.pack(n_tok)
            vector.q80_values(self.blocks[:n_tok], self.f32[:n_tok])
        else:
            self.prepare(n_tok)


def _product(m: Matrix, x: Activations, n_tok: int, lanes) -> tuple:
    """(the rows kernel, its weight arguments, its inputs, its scratch) of m times x[:n_tok]:
    quantized weights take x's 8-bit form for their type (WeightType.activation) when it has
    one, else its packed f32, and the scratch lanes."""
    t = m.weight_type
    if not t.quantized:
        return resolve(t.kernels.rows_f32), (m.w,), (x.f32[:n_tok],), ()
    if t.activation in x.codes8:
        xq, xsum, xd = x.codes8[t.activation]
        return resolve(t.kernels.rows_8bit), (m.qs, m.d), (xq[:n_tok], xsum[:n_tok], xd[:n_tok]), lanes
    return resolve(t.kernels.rows_f32), (m.qs, m.d), (x.xt[:n_tok],), lanes


def matmul(pool: threads.Pool, lanes, m: Matrix, x: Activations, n_tok: int, out: np.ndarray) -> None:
    """out (T, own rows) = x[:T] @ m.T (see _product).
    lanes: the quantized products' (CHUNKS, GROUP) i32 and f32 scratch."""
    kernel, weights, inputs, scratch = _product(m, x, n_tok, lanes)
    args = weights + inputs + scratch
    if pool.parallel(m.rows * m.cols * n_tok):
        vector.PARALLEL[kernel](*args, out)
    else:
        kernel(0, m.rows, 0, *args, out)


class Batch:
    """One step's rows, in one int64 array that rank 0 broadcasts whole (the step's wire
    format): [op, n_rows, n_logits, greedy, tokens (max_rows), slots (max_rows), positions
    (max_rows), logit_rows (max_logits)]. op tells followers what to do (see scheduler);
    greedy: rank 0 wants only each logit row's greedy token, not its logits (Engine.step)."""

    HEADER = 4

    def __init__(self, max_rows: int, max_logits: int):
        self.max_rows, self.max_logits = max_rows, max_logits
        self.wire = np.zeros(self.HEADER + 3 * max_rows + max_logits, np.int64)
        body = self.wire[self.HEADER :]
        self.tokens, self.slots, self.positions = (body[i * max_rows : (i + 1) * max_rows] for i in range(3))
        self.logit_rows = body[3 * max_rows :]  # indices of the rows whose logits rank 0 gets, ascending

    @property
    def op(self) -> int:
        return int(self.wire[0])

    @property
    def n(self) -> int:
        return int(self.wire[1])

    @property
    def n_logits(self) -> int:
        return int(self.wire[2])

    @property
    def greedy(self) -> bool:
        return bool(self.wire[3])

    @greedy.setter
    def greedy(self, value: bool) -> None:
        self.wire[3] = int(value)

    def clear(self, op: int = 0) -> None:
        self.wire[:4] = (op, 0, 0, 0)

    def add(self, token: int, slot: int, position: int, logits: bool) -> None:
        n, m = self.n, self.n_logits
        self.tokens[n], self.slots[n], self.positions[n] = token, slot, position
        if logits:
            self.logit_rows[m] = n
            self.wire[2] = m + 1
        self.wire[1] = n + 1


class Engine:
    def __init__(self, comm: Comm, plan: Plan, weights: LocalWeights, max_seq_len: int, buffer_type: str,
                 n_slots: int = 1, max_rows: int = 64, max_logits: int | None = None,
                 kv_type: str = quant.DEFAULT_KV_TYPE):
        """max_logits: rows of one step that may want logits; by default n_slots (one row per
        sequence: its next token), more (at most max_rows, which larger values mean) where every
        row of a prompt block wants its logits (perplexity.py). Their buffers are allocated here.
        kv_type: how the KV cache holds keys and values (quant.KV_TYPES)."""
        spec, me = plan.spec, plan.ranks[comm.rank]
        self.comm, self.plan, self.w, self.spec = comm, plan, weights, spec
        self.pool = threads.Pool()  # the rank's thread count as set at launch
        self.max_seq_len, self.n_slots = max_seq_len, n_slots
        # rows per step: a prompt chunk, or one decoding row of every slot's sequence at once
        self.max_rows = t_max = max(n_slots, min(max_rows, max_seq_len))
        # by default at most one row per sequence wants logits
        self.max_logits = m_max = n_slots if max_logits is None else max(n_slots, min(max_logits, t_max))
        hd, nh, nkv = spec.head_dim, me.n_local_heads, me.n_local_kv_heads

        self.x = np.zeros((t_max, spec.dim), F32)  # (T, dim) residual stream
        self.xb = Activations(spec.dim, t_max, plan.activation_forms("xb", buffer_type))  # (T, dim) normed input
        self.qkv = np.zeros((t_max, (nh + 2 * nkv) * hd), F32)  # own q, k, v rows: the stacked product
        self.q = np.zeros((t_max, nh * hd), F32)  # own query heads
        self.k = np.zeros((t_max, nkv * hd), F32)  # own KV heads, before they go to the cache
        self.v = np.zeros((t_max, nkv * hd), F32)
        self.att = GatheredActivations(comm, plan, "att", spec.q_dim, t_max, buffer_type)  # (T, n_heads * hd)
        self.att_scratch = vector.attention_scratch(nh, hd, self.pool.n_threads)
        self.kv_of_head = np.array(plan.kv_head_of(comm.rank), dtype=np.int64)
        self.dim_out = GatheredActivations(comm, plan, "dim", spec.dim, t_max, buffer_type)  # wo / w2 output
        a, b = me.ffn_rows
        if not spec.moe:
            self.h13 = np.zeros((t_max, 2 * (b - a)), F32)  # own w1 rows, then own w3 rows
        # a mixture of experts gathers k = n_experts_used hidden vectors a row, one per (row, choice)
        # pair, in the routing's order (vector.route): expert by expert, so each expert's pairs are
        # contiguous rows here, as its w2 product takes them
        k = spec.n_experts_used if spec.moe else 1
        self.ffn = GatheredActivations(comm, plan, "ffn", spec.hidden_dim, k * t_max, buffer_type)  # (k T, hidden)
        if spec.moe:
            e = spec.n_experts
            self.routers = [Matrix("f32", e, spec.dim, w=lw["router"]) for lw in weights.layers]  # replicated
            self.router_logits = np.zeros((t_max, e), F32)  # (T, E)
            self.chosen, self.expert_weights = np.zeros((t_max, k), np.int64), np.zeros((t_max, k), F32)
            self.pair_order, self.pair_rows = np.zeros(k * t_max, np.int64), np.zeros(k * t_max, np.int64)
            self.expert_starts, self.used_experts = np.zeros(e + 1, np.int64), np.zeros(e, np.int64)
            # each (row, choice) pair's input, hidden and output rows, in routing order
            self.expert_x = Activations(spec.dim, k * t_max, plan.activation_forms("xb", buffer_type))  # (k T, dim)
            self.expert_h13 = np.zeros((k * t_max, 2 * (b - a)), F32)  # (k T, own w1 rows, then own w3 rows)
            self.expert_out = np.zeros((k * t_max, _count(me.dim_rows)), F32)  # (k T, own dim rows)
            # scratch lanes, one row per task: tasks <= max(experts chosen, CHUNKS) (qmatmul.expert_chunks)
            self.expert_lanes = tuple(np.zeros((max(e, vector.CHUNKS), GROUP), t) for t in (np.int32, F32))
            self.ffn._plan_for(k)  # decoding's gather, made now
        # KV cache of own KV heads, per layer: codes (n_slots, n_local_kv, max_seq, head_dim) and
        # fp16 scale bits (n_slots, n_local_kv, max_seq, scales per row) in kv_type (vector.store_kv)
        self.kv_type = kv = quant.KV_TYPES[kv_type]
        self.k_cache = np.zeros((spec.n_layers, n_slots, nkv, max_seq_len, hd), kv.code_dtype)
        self.v_cache = np.zeros_like(self.k_cache)
        self.k_scales = np.zeros((spec.n_layers, n_slots, nkv, max_seq_len, kv.scales_per_row(hd)), np.uint16)
        self.v_scales = np.zeros_like(self.k_scales)
        self.cos, self.sin = vector.rope_table(spec.rope_freqs(), max_seq_len)  # (max_seq, hd / 2)
        self.cos_rows, self.sin_rows = np.zeros((t_max, self.cos.shape[1]), F32), np.zeros((t_max, self.sin.shape[1]), F32)
        self.lanes = (np.zeros((vector.CHUNKS, GROUP), np.int32), np.zeros((vector.CHUNKS, GROUP), F32))
        # a stacked product of Parts: each part's output, by its row count, before it takes its columns
        stacks = [layer[k] for layer in weights.layers for k in ("wqkv", "w13") if k in layer]
        self._part_out = {m.rows: np.zeros((t_max, m.rows), F32) for stack in stacks if isinstance(stack, Parts)
                          for m in stack.parts}
        # experts whose w1 and w3 differ in type: each part's rows of every (row, choice) pair
        widths = {m.rows // layer["experts"].n for layer in weights.layers if "experts" in layer
                  and len(layer["experts"].w13) > 1 for m in layer["experts"].w13}
        self._part_out.update({w: np.zeros((k * t_max, w), F32) for w in widths})
        # logits: rank 0 gets (m, vocab) for the m rows that want them. Each rank computes its
        # vocabulary span for the m rows, contiguous (m, own); they travel rank-major.
        vocab_spans = plan.segments("vocab")
        a, b = vocab_spans[comm.rank]
        self.vocab_start, self._vocab_spans = a, vocab_spans
        self.x_logits = np.zeros((m_max, spec.dim), F32)  # the residual rows that want logits
        self.logits = np.zeros((m_max, spec.vocab_size), F32)  # rank 0
        self._logits_transit = np.zeros(m_max * spec.vocab_size, F32)
        self._gather_logits = [None] + [
            comm.gather_to_root(self._logits_transit[: m * spec.vocab_size], tuple((m * s, m * e) for s, e in vocab_spans))
            for m in range(1, m_max + 1)]
        self.vocab_owner = np.repeat(np.arange(plan.world_size), [e - s for s, e in vocab_spans])
        # greedy steps: each rank's best (value, token id) per row instead of its logits, as f32
        # (ids below 2**24 are exact), rank-major: (size, m, 2); rank 0 picks across ranks
        if spec.vocab_size >= 2**24:
            raise ValueError(f"a vocabulary of {spec.vocab_size} tokens: token ids must fit an f32 exactly (< 2**24)")
        size = plan.world_size
        self._best = np.zeros(size * m_max * 2, F32)
        self._gather_best = [None] + [
            comm.gather_to_root(self._best[: size * m * 2], tuple((r * m * 2, (r + 1) * m * 2) for r in range(size)))
            for m in range(1, m_max + 1)]
        self.picks = np.zeros(m_max, np.int64)  # rank 0: the greedy token of each logit row
        self._batch = Batch(t_max, m_max)  # forward()'s and forward_block()'s, on slot 0
        self.forward_s = 0.0  # wall time in step()
        self.collective_s = 0.0  # ... of which inside collectives (waiting for other ranks included)

    @property
    def kv_cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes + self.k_scales.nbytes + self.v_scales.nbytes

    def new_batch(self) -> Batch:
        return Batch(self.max_rows, self.max_logits)

    def matmul(self, m: Matrix, x: Activations, n_tok: int, out: np.ndarray) -> None:
        matmul(self.pool, self.lanes, m, x, n_tok, out)

    def matmul_experts(self, m: Matrix, n_experts: int, x: Activations, n_chosen: int, out: np.ndarray) -> None:
        """Each chosen expert's product with its rows of the step: m stacks n_experts experts'
        rows; an expert's inputs and outputs are rows [starts[e], starts[e + 1]) of x and out (the
        routing's order). All in one parallel region where the work is enough for threads."""
        per_expert, starts, used = m.rows // n_experts, self.expert_starts, self.used_experts[:n_chosen]
        n_rows = int(starts[-1])
        kernel, weights, inputs, scratch = _product(m, x, n_rows, self.expert_lanes)
        if self.pool.parallel(per_expert * m.cols * n_rows):
            vector.EXPERTS[kernel](used, starts, per_expert, *weights, *inputs, *scratch, out)
            return
        for e in used:
            a, b, w0 = starts[e], starts[e + 1], e * per_expert
            kernel(0, per_expert, 0, *(w[w0 : w0 + per_expert] for w in weights), *(v[a:b] for v in inputs), *scratch,
                   out[a:b])

    def matmul_stacked(self, m: Matrix | Parts, x: Activations, n_tok: int, out: np.ndarray) -> None:
        """A stacked product: one, or one per part where the parts' types differ (out: (T, rows))."""
        self._part_by_part(m.parts if isinstance(m, Parts) else (m,), out, lambda part, o: self.matmul(part, x, n_tok, o))

    def _part_by_part(self, parts: tuple[Matrix, ...], out: np.ndarray, product, n_experts: int = 1) -> None:
        """product(part, part's out) for each part of a stack: one of one type straight into out;
        else one after another, each part's rows (of each expert) then copied to its columns of out."""
        if len(parts) == 1:
            return product(parts[0], out)
        col = 0
        for part in parts:
            width = part.rows // n_experts
            part_out = self._part_out[width][: out.shape[0]]
            product(part, part_out)
            out[:, col : col + width] = part_out
            col += width

    def experts_ffn(self, layer: int, experts: Experts, n: int) -> None:
        """A mixture of experts' FFN of the normed rows xb[:n] into dim_out.local[:n] (own dim
        rows), with the collectives of a dense FFN: every rank routes alike (the router is
        replicated), runs its rows of each chosen expert on that expert's rows of the step
        (each expert's weights read once a step, as llama.cpp's mul_mat_id), gathers the
        hidden vectors of all (row, choice) pairs at once, then its dim rows of each chosen
        expert's w2, summed per row in choice order with the routing weights."""
        spec, k = self.spec, self.spec.n_experts_used
        self.matmul(self.routers[layer], self.xb, n, self.router_logits[:n])
        n_chosen = vector.route(self.router_logits[:n], k, spec.expert_weights_norm, self.chosen[:n],
                                self.expert_weights[:n], self.pair_order[: k * n], self.pair_rows[: k * n],
                                self.expert_starts, self.used_experts)
        x, h13 = self.expert_x, self.expert_h13[: k * n]
        x.take_rows(self.xb, self.pair_rows[: k * n])  # each (row, choice) pair's input row, in routing order
        self._part_by_part(experts.w13, h13, lambda part, o: self.matmul_experts(part, experts.n, x, n_chosen, o),
                           experts.n)
        vector.silu_mul(h13, self.ffn.local[: k * n])
        self.ffn.gather(k * n)
        self.matmul_experts(experts.w2, experts.n, self.ffn, n_chosen, self.expert_out[: k * n])
        vector.combine_experts(self.expert_out[: k * n], self.pair_order[: k * n], self.expert_weights[:n],
                               self.dim_out.local[:n])

    def forward(self, token: int, pos: int, logits: bool = True) -> np.ndarray | None:
        """Advance slot 0 by one token at `pos`; rank 0 returns the logits (vocab,) when asked."""
        return self.forward_block((token,), pos, logits)

    def forward_block(self, tokens, pos0: int, logits: bool = True) -> np.ndarray | None:
        """Advance slot 0 by len(tokens) <= max_rows tokens at positions pos0...; rank 0 returns
        the logits (vocab,) of the last one when asked (the array is reused by the next call)."""
        batch, n = self._batch, len(tokens)
        batch.clear()
        for t in range(n):
            batch.add(int(tokens[t]), 0, pos0 + t, logits and t == n - 1)
        out = self.step(batch)
        return None if out is None else out[0]

    def step(self, batch: Batch) -> np.ndarray | None:
        """Run one step (collective: every rank with the same batch). Rank 0 returns the logits
        (batch.n_logits, vocab) of the rows in batch.logit_rows, in that order, or with
        batch.greedy their greedy tokens (batch.n_logits,) int64: the first largest logit's,
        as the sampler at temperature 0 picks it, with 8 bytes a row and rank to gather instead
        of the vocabulary (the array is reused by the next step); other ranks return None."""
        t0, c0 = time.perf_counter(), self.comm.collective_s
        spec, w, n = self.spec, self.w, batch.n
        slots, positions = batch.slots[:n], batch.positions[:n]
        if (not 0 < n <= self.max_rows or positions.min() < 0 or positions.max() >= self.max_seq_len
                or slots.min() < 0 or slots.max() >= self.n_slots):
            raise ValueError(f"a step of {n} rows at positions {positions.min()}..{positions.max()} in slots "
                             f"{slots.min()}..{slots.max()} does not fit (at most {self.max_rows} rows, context "
                             f"{self.max_seq_len}, {self.n_slots} slots)")
        x = self.x[:n]
        if self.comm.size > 1:
            x[...] = 0  # the rows of tokens other ranks hold: they OR theirs in
        for t in range(n):
            token = int(batch.tokens[t])
            if self.vocab_owner[token] == self.comm.rank:
                w.embedding.row_to(token - self.vocab_start, self.x[t])
        self.comm.combine_rows(x)  # every row from the rank holding its token, all rows in one collective
        cos, sin = self.cos_rows[:n], self.sin_rows[:n]
        np.take(self.cos, positions, axis=0, out=cos)
        np.take(self.sin, positions, axis=0, out=sin)
        hd = spec.head_dim
        q, k, v, qkv = self.q[:n], self.k[:n], self.v[:n], self.qkv[:n]
        nq, nk = q.shape[1], k.shape[1]
        for layer, lw in enumerate(w.layers):
            vector.rmsnorm(x, lw["attention_norm"], spec.norm_eps, self.xb.f32[:n])
            self.xb.prepare(n)
            self.matmul_stacked(lw["wqkv"], self.xb, n, qkv)
            q[...], k[...], v[...] = qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]
            if spec.qkv_bias:
                np.add(q, lw["bq"], out=q)
                np.add(k, lw["bk"], out=k)
                np.add(v, lw["bv"], out=v)
            if spec.qk_norm:
                vector.rmsnorm_heads(q, hd, lw["q_norm"], spec.norm_eps)
                vector.rmsnorm_heads(k, hd, lw["k_norm"], spec.norm_eps)
            vector.rope(q, hd, cos, sin)
            vector.rope(k, hd, cos, sin)
            cache = (self.k_cache[layer], self.k_scales[layer], self.v_cache[layer], self.v_scales[layer])
            vector.store_kv(k, v, slots, positions, *cache)
            att = (q.reshape(n, -1, hd), *cache, self.kv_of_head, slots, positions, *self.att_scratch,
                   self.att.local[:n].reshape(n, -1, hd))
            if self.pool.parallel(q.size * (int(positions.max()) + 1) * 2):
                vector.attention(*att)
            else:
                vector.attention_chunk(0, 1, *att)
            self.att.gather(n)
            self.matmul(lw["wo"], self.att, n, self.dim_out.local[:n])
            self.dim_out.gather(n)
            np.add(x, self.dim_out.f32[:n], out=x)

            vector.rmsnorm(x, lw["ffn_norm"], spec.norm_eps, self.xb.f32[:n])
            self.xb.prepare(n)
            if spec.moe:
                self.experts_ffn(layer, lw["experts"], n)
            else:
                h13 = self.h13[:n]
                self.matmul_stacked(lw["w13"], self.xb, n, h13)
                vector.silu_mul(h13, self.ffn.local[:n])
                self.ffn.gather(n)
                self.matmul(lw["w2"], self.ffn, n, self.dim_out.local[:n])
            self.dim_out.gather(n)
            np.add(x, self.dim_out.f32[:n], out=x)
        result, m = None, batch.n_logits
        if m:
            rows = batch.logit_rows[:m]
            x_out = self.x_logits[:m]
            np.take(x, rows, axis=0, out=x_out)
            vector.rmsnorm(x_out, w.norm, spec.norm_eps, self.xb.f32[:m])
            self.xb.prepare(m)
            a, b = self._vocab_spans[self.comm.rank]
            local = self._logits_transit[m * a : m * b].reshape(m, b - a)
            self.matmul(w.classifier, self.xb, m, local)
            if batch.greedy:
                r = self.comm.rank
                mine = self._best[r * m * 2 : (r + 1) * m * 2].reshape(m, 2)
                vector.row_argmax(local, a, mine)
                self._gather_best[m]()
                if r == 0:
                    vector.pick_best(self._best[: self.comm.size * m * 2].reshape(self.comm.size, m, 2), self.picks[:m])
                    result = self.picks[:m]
            else:
                self._gather_logits[m]()
            if self.comm.rank == 0 and not batch.greedy:
                for s, e in self._vocab_spans:
                    self.logits[:m, s:e] = self._logits_transit[m * s : m * e].reshape(m, e - s)
                result = self.logits[:m]
        self.forward_s += time.perf_counter() - t0
        self.collective_s += self.comm.collective_s - c0
        return result
