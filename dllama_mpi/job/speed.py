"""Each rank's speed on this model, measured on the real kernels before anything is loaded
(`--memory-budget auto`).

A rank's share s of the model (its fraction of every matrix's rows) costs it, per decoded
token, about a * s + o seconds: `a` the time of the whole model's matrix products, `o` what
every rank does whatever its share (norms, quantizing and unpacking the full-width vectors).
Each rank times one token's work at three shares, with this model's matrix shapes, weight
type, buffer type and the rank's own threads, on matrices of arbitrary values (the kernels'
time does not depend on them), up to STREAM_BYTES of layers so that they are read from
memory as the real weights are (a share whose whole model fits a cache is timed so too).
All ranks measure at once, for the same fixed wall time per share, so ranks that share a
node's cores and memory bandwidth are measured as they will run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..kernels import qmatmul, vector
from ..model import quant
from ..model.spec import ModelSpec
from ..parallel import threads
from ..parallel.comm import Comm
from ..parallel.plan import activation_forms
from .engine import GROUP, Activations, matmul
from .weights import Matrix

SHARES = (0.25, 0.5, 1.0)  # of the whole model (clipped below at one row block)
SECONDS_PER_SHARE = 0.4  # wall time each rank spends timing each share
STREAM_BYTES = 64 * 2**20  # matrices timed per pass at least, per share (all shares' held while measuring)


@dataclass(frozen=True)
class RankSpeed:
    per_share_s: float  # a: seconds per token for the whole model's products (share 1)
    fixed_s: float  # o: seconds per token whatever the share
    samples: tuple[tuple[float, float], ...]  # (share, seconds per token) as measured

    def token_s(self, share: float) -> float:
        return self.per_share_s * share + self.fixed_s


def held_matrix(kind: str, rows: int, cols: int) -> Matrix:
    """A matrix as the kernels hold it with arbitrary contents (fp16 scales of 2**-10)."""
    t = quant.WEIGHTS[quant.storage_type(kind, cols)]
    if not t.quantized:  # values of 2**-10 (f16's as their bits)
        return Matrix.from_stored(np.full((rows, cols), 2**-10, t.dtype), cols)
    layout, g = t.layout, qmatmul.groups(cols // quant.BLOCK)
    qs = np.full((rows, layout.code_bytes * g), 0x5A, np.uint8).view(layout.packed[0])
    if layout.super_scales:  # 8-bit scales (and mins) of 1, fp16 d (and dmin) of 2**-10
        d = np.ones((rows, g, layout.scale_bytes), np.uint8)
        d[:, :, 2 * GROUP :] = np.frombuffer(np.float16(2**-10).tobytes() * ((layout.scale_bytes - 2 * GROUP) // 2), np.uint8)
    else:  # an fp16 d a block
        d = np.full((rows, g, GROUP), 0x1400, np.uint16)
    return Matrix(t.name, rows, cols, d=d.reshape(rows, -1).view(layout.packed[1]), qs=qs)


def layer_shapes(spec: ModelSpec) -> list[tuple[int, int, str, str]]:
    """(rows of the whole model, cols, input, matrix kind) of each product of a layer; the
    input names which full-width vector it reads, the kind the stored type."""
    qkv = spec.q_dim + 2 * spec.n_kv_heads * spec.head_dim
    ffn = [(2 * spec.hidden_dim, spec.dim, "dim", "w1"), (spec.dim, spec.hidden_dim, "ffn", "w2")]
    # a mixture of experts: the FFN of each expert a token uses, each its own matrices (read from memory)
    return [(qkv, spec.dim, "dim", "wq"), (spec.dim, spec.q_dim, "att", "wo")] + ffn * max(1, spec.n_experts_used)


def _timed(work, seconds: float, clock) -> float:
    """Seconds per call of work() on `clock`, run repeatedly for about `seconds` (at least twice)."""
    work()  # warm
    n, t0 = 0, clock()
    while True:
        work()
        n += 1
        elapsed = clock() - t0
        if elapsed >= seconds and n >= 2:
            return elapsed / n


class _Workload:
    """One token's products for a rank holding `share` of every matrix's rows, on matrices of
    arbitrary contents, enough layers' worth to stream from memory as the real weights do."""

    def __init__(self, spec: ModelSpec, buffer_type: str, share: float, pool: threads.Pool):
        self.spec, self.pool = spec, pool
        inputs = {"dim": Activations(spec.dim, 1, activation_forms(spec, "xb", buffer_type)),
                  "att": Activations(spec.q_dim, 1, activation_forms(spec, "att", buffer_type)),
                  "ffn": Activations(spec.hidden_dim, 1, activation_forms(spec, "ffn", buffer_type))}
        self.lanes = (np.zeros((vector.CHUNKS, GROUP), np.int32), np.zeros((vector.CHUNKS, GROUP), np.float32))

        def rows(n: int) -> int:
            return max(1, round(share * n))

        shapes = layer_shapes(spec)

        def layer(i: int):  # layer i's products, in its own types
            return [(held_matrix(spec.tensor_type(kind, i), rows(r), c), inputs[x]) for r, c, x, kind in shapes]

        first = layer(0)
        layer_bytes = sum(m.nbytes for m, _ in first)
        self.copies = max(1, min(spec.n_layers, -(-STREAM_BYTES // max(layer_bytes, 1))))
        self.layers = [first] + [layer(i) for i in range(1, self.copies)]  # the first layers' types stand for all
        self.outs = [np.zeros((1, m.rows), np.float32) for m, _ in first]
        # a mixture of experts' router: replicated, every rank's whatever its share
        if spec.moe:
            self.router = held_matrix("f32", spec.n_experts, spec.dim)
            self.router_logits = np.zeros((1, spec.n_experts), np.float32)
        else:
            self.router = None
        # the full-width vectors every rank prepares per layer, whatever its share
        self.replicated = [inputs["dim"], inputs["dim"], inputs["att"], inputs["dim"], inputs["ffn"], inputs["dim"]]
        self.classifier = held_matrix(spec.tensor_type("tok_embeddings" if spec.shared_classifier else "output"),
                                  rows(spec.vocab_size), spec.dim)
        self.logits = np.zeros((1, self.classifier.rows), np.float32)
        self.x = inputs["dim"]

    def layers_pass(self) -> None:
        for products in self.layers:
            for x in self.replicated:
                x.prepare(1)
            for (m, x), out in zip(products, self.outs):
                matmul(self.pool, self.lanes, m, x, 1, out)
            if self.router is not None:
                matmul(self.pool, self.lanes, self.router, self.x, 1, self.router_logits)

    def classify(self) -> None:
        matmul(self.pool, self.lanes, self.classifier, self.x, 1, self.logits)

    def token_seconds(self, seconds: float, clock) -> float:
        """Seconds per decoded token, timed on `clock` for about `seconds`."""
        per_layer = _timed(self.layers_pass, seconds * 0.8, clock) / self.copies
        return self.spec.n_layers * per_layer + _timed(self.classify, seconds * 0.2, clock)


def fit(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line t = a * s + o through (s, t); a > 0 and o >= 0."""
    s = np.array([p[0] for p in samples])
    t = np.array([p[1] for p in samples])
    a, o = np.polyfit(s, t, 1)
    if o < 0 or a <= 0:  # no fixed cost visible, or noise hid the slope: a line through the origin
        a, o = float((s * t).sum() / (s * s).sum()), 0.0
    return float(a), float(o)


def measure(comm: Comm, spec: ModelSpec, buffer_type: str, clock=time.perf_counter) -> RankSpeed:
    """Collective: this rank's RankSpeed, timed on `clock` (tests give one that counts work, to
    know what each rank measures). All ranks time the same share at the same time, the shares
    up and down again; each point is the mean of both."""
    pool = threads.Pool()
    # every share's matrices at once (up to STREAM_BYTES each, and a classifier's share), built
    # before any timing, so that no rank allocates while another on its core is timing
    workloads = {share: _Workload(spec, buffer_type, share, pool) for share in SHARES}
    times: dict[float, list[float]] = {share: [] for share in SHARES}
    for share in (*SHARES, *reversed(SHARES)):
        comm.sleeping_barrier()
        times[share].append(workloads[share].token_seconds(SECONDS_PER_SHARE / 2, clock))
    del workloads
    comm.sleeping_barrier()
    samples = [(share, float(np.mean(times[share]))) for share in SHARES]
    a, o = fit(samples)
    return RankSpeed(a, o, tuple(samples))


def collective_seconds(comm: Comm, spec: ModelSpec, reps: int = 5) -> float:
    """Seconds per decoded token in collectives alone (4 Allgatherv per layer of full-width
    vectors, evenly split), the median of `reps`; 0 on one rank."""
    if comm.size == 1:
        return 0.0
    width = max(spec.dim, spec.ffn_rows_per_token)  # a mixture of experts gathers each used expert's hidden values
    buf = np.zeros(width, np.float32)
    bounds = np.linspace(0, width, comm.size + 1).astype(int)
    gather = comm.gatherer(buf, tuple((int(a), int(b)) for a, b in zip(bounds, bounds[1:])))
    counted = comm.collective_s, comm.bytes_sent  # the job's own statistics start after this
    comm.sleeping_barrier()
    times = []
    for _ in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(4 * spec.n_layers):
            gather()
        times.append(time.perf_counter() - t0)
    comm.collective_s, comm.bytes_sent = counted
    return float(np.median(times))
