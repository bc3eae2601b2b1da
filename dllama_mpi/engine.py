"""Run state and the per-token forward pass of one rank.

Every buffer and the KV cache are allocated once in Engine.__init__; forward() allocates
nothing. Per layer (x replicated on every rank):

  x -> rmsnorm -> own q/k/v rows -> rope -> attention over own KV cache -> Allgatherv(att)
    -> own wo rows -> Allgatherv(dim) -> x += ; x -> rmsnorm -> own w1/w3 rows -> silu*mul
    -> Allgatherv(ffn) -> own w2 rows -> Allgatherv(dim) -> x +=
then own classifier rows -> Gatherv(logits) to rank 0.
"""

from __future__ import annotations

import time

import numpy as np

from . import kernels, threads
from .comm import Comm
from .plan import Plan
from .weights import LocalWeights, Matrix

F32 = np.float32


class Vector:
    """A full-length activation, identical on every rank, with its Q80 form when the buffer
    type is q80 and the length is whole blocks (the input Q40 matrices take)."""

    def __init__(self, n: int, q80: bool):
        self.f32 = np.zeros(n, F32)  # (n,)
        self.q80 = q80 and n % kernels.BLOCK == 0
        nb = n // kernels.BLOCK if self.q80 else 0
        self.blocks = np.zeros((nb, 34), np.uint8)  # (nb, 34) Q80
        self.d = np.zeros(nb, F32)  # (nb,) decoded scales

    def quantize(self) -> None:
        if self.q80:
            kernels.quantize_q80(self.f32, self.blocks)
            kernels.q80_scales(self.blocks, self.d)


class GatheredVector(Vector):
    """A vector each rank computes a span of (`local`), then Allgatherv'd: as Q80 blocks
    when the plan says every split falls on block boundaries, else as f32."""

    def __init__(self, comm: Comm, plan: Plan, name: str, n: int, q80: bool):
        super().__init__(n, q80)
        spans = plan.segments(name)
        a, b = spans[comm.rank]
        self.local = self.f32[a:b]
        self.travels_q80 = self.q80 and plan.q80_aligned(name)
        if self.travels_q80:
            bs = kernels.BLOCK
            self._local_blocks = self.blocks[a // bs : b // bs]
            self._gather = comm.gatherer(self.blocks, tuple((s // bs, e // bs) for s, e in spans))
        else:
            self._gather = comm.gatherer(self.f32, spans)

    def gather(self) -> None:
        if self.travels_q80:
            kernels.quantize_q80(self.local, self._local_blocks)
            self._gather()
            kernels.q80_scales(self.blocks, self.d)
            kernels.dequantize_q80(self.blocks, self.d, self.f32)
        else:
            self._gather()
            self.quantize()


def matvec(m: Matrix, x: Vector, out: np.ndarray, pool: threads.Pool) -> None:
    """out = m @ x on this rank's rows; quantized weights take x's Q80 form when it has one."""
    pool.size_for(m.rows * m.cols)
    if m.type == "f32":
        kernels.matvec_f32(m.w, x.f32, out)
    elif m.type == "f16":
        kernels.matvec_f16(m.w, kernels.F16_TABLE, x.f32, out)
    elif m.type == "q40":
        if x.q80:
            kernels.matvec_q40_q80(m.d, m.qs, x.blocks, x.d, out)
        else:
            kernels.matvec_q40_f32(m.d, m.qs, x.f32, out)
    elif x.q80:
        kernels.matvec_q80_q80(m.d, m.qs, x.blocks, x.d, out)
    else:
        kernels.matvec_q80_f32(m.d, m.qs, x.f32, out)


class Engine:
    def __init__(self, comm: Comm, plan: Plan, weights: LocalWeights, max_seq_len: int, buffer_type: str):
        spec, me = plan.spec, plan.ranks[comm.rank]
        self.comm, self.plan, self.w, self.spec = comm, plan, weights, spec
        self.pool = threads.Pool()  # the rank's thread count as set at launch
        self.max_seq_len = max_seq_len
        q80 = buffer_type == "q80"
        hd, nh, nkv = spec.head_dim, me.n_local_heads, me.n_local_kv_heads

        self.x = np.zeros(spec.dim, F32)  # (dim,) residual stream
        self.xb = Vector(spec.dim, q80)  # (dim,) normed input of a block
        self.q = np.zeros((nh, hd), F32)  # own query heads
        self.att = GatheredVector(comm, plan, "att", spec.q_dim, q80)  # (n_heads * hd,)
        self.att_local = self.att.local.reshape(nh, hd)
        self.scores = np.zeros((nh, max_seq_len), F32)
        self.kv_of_head = np.array(plan.kv_head_of(comm.rank), dtype=np.int64)
        self.dim_out = GatheredVector(comm, plan, "dim", spec.dim, q80)  # (dim,) wo / w2 output
        a, b = me.ffn_rows
        self.h1 = np.zeros(b - a, F32)
        self.h3 = np.zeros(b - a, F32)
        self.ffn = GatheredVector(comm, plan, "ffn", spec.hidden_dim, q80)  # (hidden,)
        # KV cache of own KV heads: (n_layers, max_seq, n_local_kv, head_dim)
        self.k_cache = np.zeros((spec.n_layers, max_seq_len, nkv, hd), F32)
        self.v_cache = np.zeros_like(self.k_cache)
        self.cos, self.sin = kernels.rope_table(spec.rope_freqs(), max_seq_len)
        self.logits = np.zeros(spec.vocab_size, F32)  # rank 0: all; others: own span
        vocab_spans = plan.segments("vocab")
        a, b = vocab_spans[comm.rank]
        self.logits_local = self.logits[a:b]
        self._gather_logits = comm.gather_to_root(self.logits, vocab_spans)
        self.vocab_owner = np.repeat(np.arange(plan.world_size), [e - s for s, e in vocab_spans])
        self.vocab_start = a
        self.forward_s = 0.0  # wall time in forward()
        self.collective_s = 0.0  # ... of which inside collectives (waiting for other ranks included)

    @property
    def kv_cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def forward(self, token: int, pos: int, logits: bool = True) -> np.ndarray | None:
        """Advance by one token at `pos`; rank 0 returns the logits (vocab,) when asked."""
        t0, c0 = time.perf_counter(), self.comm.collective_s
        spec, w, x = self.spec, self.w, self.x
        owner = int(self.vocab_owner[token])
        if owner == self.comm.rank:
            self._embed(token - self.vocab_start)
        self.comm.bcast(x, owner)
        cos, sin = self.cos[pos], self.sin[pos]
        hd = spec.head_dim
        for layer, lw in enumerate(w.layers):
            kernels.rmsnorm(x, lw["attention_norm"], spec.norm_eps, self.xb.f32)
            self.xb.quantize()
            k = self.k_cache[layer, pos]
            v = self.v_cache[layer, pos]
            q, k, v = self.q.reshape(-1), k.reshape(-1), v.reshape(-1)
            matvec(lw["wq"], self.xb, q, self.pool)
            matvec(lw["wk"], self.xb, k, self.pool)
            matvec(lw["wv"], self.xb, v, self.pool)
            if spec.qkv_bias:
                np.add(q, lw["bq"], out=q)
                np.add(k, lw["bk"], out=k)
                np.add(v, lw["bv"], out=v)
            if spec.qk_norm:
                kernels.rmsnorm_heads(q, self.q.shape[0], hd, lw["q_norm"], spec.norm_eps)
                kernels.rmsnorm_heads(k, k.shape[0] // hd, hd, lw["k_norm"], spec.norm_eps)
            kernels.rope(q, self.q.shape[0], hd, cos, sin)
            kernels.rope(k, k.shape[0] // hd, hd, cos, sin)
            self.pool.size_for(self.q.size * (pos + 1) * 2)
            kernels.attention(self.q, self.k_cache[layer], self.v_cache[layer], self.kv_of_head,
                              pos + 1, self.scores, self.att_local)
            self.att.gather()
            matvec(lw["wo"], self.att, self.dim_out.local, self.pool)
            self.dim_out.gather()
            np.add(x, self.dim_out.f32, out=x)

            kernels.rmsnorm(x, lw["ffn_norm"], spec.norm_eps, self.xb.f32)
            self.xb.quantize()
            matvec(lw["w1"], self.xb, self.h1, self.pool)
            matvec(lw["w3"], self.xb, self.h3, self.pool)
            kernels.silu_mul(self.h1, self.h3, self.ffn.local)
            self.ffn.gather()
            matvec(lw["w2"], self.ffn, self.dim_out.local, self.pool)
            self.dim_out.gather()
            np.add(x, self.dim_out.f32, out=x)
        result = None
        if logits:
            kernels.rmsnorm(x, w.norm, spec.norm_eps, self.xb.f32)
            self.xb.quantize()
            matvec(w.classifier, self.xb, self.logits_local, self.pool)
            self._gather_logits()
            result = self.logits if self.comm.rank == 0 else None
        self.forward_s += time.perf_counter() - t0
        self.collective_s += self.comm.collective_s - c0
        return result

    def _embed(self, row: int) -> None:
        self.w.embedding.row_to(row, self.x)
