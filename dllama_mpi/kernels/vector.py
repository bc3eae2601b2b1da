"""numba kernels for one rank's share of a layer, on blocks of T tokens (T = 1 when
decoding). Each has a plain-numpy twin in reference.py.

Determinism: every output element is produced by one sequential loop whose order depends
only on the input length, never on the thread count, the rank's slice or T, so a split
never changes a result bit. prange only distributes whole output rows/heads.

Float operations run exactly as written (no fastmath): LLVM may not fuse, reorder or
vectorize a reduction differently in the serial kernel and in its parallel driver, which
made results depend on the thread count.

The quantized products (Q40/Q50/Q80/Q4K/Q5K/Q6K weights) and their layouts are in qmatmul.py; Q80
activations travel as (T, nb, 34) u8 blocks (quant.Q80 as bytes: fp16 scale, 32 int8).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from ..model import quant
from ..parallel import threads  # noqa: F401  (threads: the thread policy, before any kernel runs)
from . import qmatmul, resolve
from .qmatmul import f16_bits_to_f32

BLOCK = 32
_opts = {"cache": True, "nogil": True}
CHUNKS = qmatmul.CHUNKS  # row chunks per parallel product


@njit(**_opts)
def f32_to_f16_bits(x):
    """Round-to-nearest-even fp16 encoding of a finite non-negative float32 (a scale)."""
    ax = np.float64(x)
    if ax < 6.103515625e-05:  # below 2**-14: subnormal; m == 1024 encodes the smallest normal
        return np.uint16(np.rint(ax * 16777216.0))
    m, e = math.frexp(ax)  # ax = m * 2**e, m in [0.5, 1)
    mant = np.int64(np.rint(m * 2048.0))  # in [1024, 2048]; 2048 carries into the exponent
    bits = ((e + 14) << 10) + (mant - 1024)
    return np.uint16(min(bits, 0x7C00))


def _f16_ir(builder, bits):
    """fp16 bits (i16 IR scalar or vector) -> f32, exactly, in integer and power-of-two
    steps: `fpext half` needs F16C or a runtime function numba's JIT doesn't link (a CPU
    without F16C failed with "Symbol not found: __extendhfsf2")."""
    n_lanes = bits.type.count if isinstance(bits.type, ir.VectorType) else None
    i32, f32 = ir.IntType(32), ir.FloatType()
    ity, fty = (ir.VectorType(i32, n_lanes), ir.VectorType(f32, n_lanes)) if n_lanes else (i32, f32)

    def const(value, ty):
        return ir.Constant(ty, [value] * n_lanes) if n_lanes else ir.Constant(ty, value)

    h = builder.zext(bits, ity)
    shifted = builder.shl(builder.and_(h, const(0x7FFF, ity)), const(13, ity))  # exponent and mantissa
    # finite: the bits read as f32 are the value times 2**-112 (subnormals included): scale back
    finite = builder.bitcast(builder.fmul(builder.bitcast(shifted, fty), const(2.0**112, fty)), ity)
    special = builder.or_(shifted, const(0x7F800000, ity))  # inf and nan keep their mantissa
    is_special = builder.icmp_unsigned(">=", builder.and_(h, const(0x7C00, ity)), const(0x7C00, ity))
    magnitude = builder.select(is_special, special, finite)
    sign = builder.shl(builder.and_(h, const(0x8000, ity)), const(16, ity))
    return builder.bitcast(builder.or_(magnitude, sign), fty)


@intrinsic
def _dot_lanes(typingctx, a, b):
    """Of 1-D contiguous a (f32, or u16 fp16 bits) and b (f32): the sum of a[i] * b[i] for
    i < n - n % 8 as 8 lanes (lane l takes i = l mod 8, in order) added as a fixed tree,
    then the tail in index order. Written in IR because numba's indexing keeps LLVM from vectorizing the plain loop, and
    reassociating it (fastmath) made the order depend on how LLVM compiled each caller."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and a.layout == b.layout == "C"
            and a.ndim == b.ndim == 1 and b.dtype == types.float32 and a.dtype in (types.float32, types.uint16)):
        return None
    fp16 = a.dtype == types.uint16

    def codegen(context, builder, sig, args):
        f32, i64 = ir.FloatType(), ir.IntType(64)
        v8 = ir.VectorType(f32, 8)
        arr_a, arr_b = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        n = cgutils.unpack_tuple(builder, arr_a.shape)[0]
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8, None))
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(i64, 8))) as loop:
            i = builder.mul(loop.index, ir.Constant(i64, 8))
            pa = builder.gep(arr_a.data, [i], source_etype=ir.IntType(16) if fp16 else f32)
            pb = builder.gep(arr_b.data, [i], source_etype=f32)
            va = builder.load(pa, typ=ir.VectorType(ir.IntType(16), 8) if fp16 else v8, align=1)
            if fp16:
                va = _f16_ir(builder, va)
            vb = builder.load(pb, typ=v8, align=1)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(va, vb)), acc)
        v, width = builder.load(acc), 8
        while width > 1:  # lane i + lane i + width / 2
            width //= 2
            lanes = ir.VectorType(ir.IntType(32), width)
            lo = builder.shuffle_vector(v, v, ir.Constant(lanes, list(range(width))))
            hi = builder.shuffle_vector(v, v, ir.Constant(lanes, list(range(width, 2 * width))))
            v = builder.fadd(lo, hi)
        total = cgutils.alloca_once_value(builder, builder.extract_element(v, ir.Constant(ir.IntType(32), 0)))
        tail = builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8))
        with cgutils.for_range_slice(builder, tail, n, ir.Constant(i64, 1)) as (i, _):
            ea = builder.load(builder.gep(arr_a.data, [i], source_etype=ir.IntType(16) if fp16 else f32),
                              typ=ir.IntType(16) if fp16 else f32)
            if fp16:
                ea = _f16_ir(builder, ea)
            eb = builder.load(builder.gep(arr_b.data, [i], source_etype=f32), typ=f32)
            builder.store(builder.fadd(builder.load(total), builder.fmul(ea, eb)), total)
        return builder.load(total)

    return types.float32(a, b), codegen


def _exp_ir(builder, x):
    """exp of an f32 IR value (scalar or vector), Cephes' expf: n = round(x log2 e),
    r = x - n ln 2 in two parts, a degree-5 polynomial, times 2**n by exponent bits. About
    1 ulp; x is clamped to [-87, 88] (below: a tiny number instead of 0; above: 1.6e38, not
    inf). The same operations on a scalar and on a vector lane: the same bits either way."""
    ty = x.type
    n_lanes = ty.count if isinstance(ty, ir.VectorType) else None
    f32, i32 = ir.FloatType(), ir.IntType(32)

    def const(value, elem=f32):
        return ir.Constant(ir.VectorType(elem, n_lanes), [value] * n_lanes) if n_lanes else ir.Constant(elem, value)

    def call(name, *args):
        suffix = f"v{n_lanes}f32" if n_lanes else "f32"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [a.type for a in args]), f"llvm.{name}.{suffix}")
        return builder.call(fn, args)

    x = call("maxnum", call("minnum", x, const(88.0)), const(-87.0))
    n = call("floor", builder.fadd(builder.fmul(x, const(1.44269504088896341)), const(0.5)))
    r = builder.fsub(builder.fsub(x, builder.fmul(n, const(0.693359375))), builder.fmul(n, const(-2.12194440e-4)))
    p = const(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = builder.fadd(builder.fmul(p, r), const(c))
    y = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), const(1.0))
    itype = ir.VectorType(i32, n_lanes) if n_lanes else i32
    bits = builder.shl(builder.add(builder.fptosi(n, itype), const(127, i32)), const(23, i32))
    return builder.fmul(y, builder.bitcast(bits, ty))


@intrinsic
def _exp_into(typingctx, src, scale, shift, dst):
    """dst[i] = exp(src[i] * scale - shift) (see _exp_ir) over 1-D contiguous f32 arrays of
    one length, 8 lanes at a time and the tail one by one; dst may be src."""
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == types.float32
                for a in (src, dst)) and scale == shift == types.float32):
        return None

    def codegen(context, builder, sig, args):
        f32, i64 = ir.FloatType(), ir.IntType(64)
        a_src, a_dst = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3))
        n = cgutils.unpack_tuple(builder, a_src.shape)[0]
        whole = builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8))
        for width, start, stop, step in ((8, ir.Constant(i64, 0), whole, 8), (None, whole, n, 1)):
            if width:  # scale and shift in every lane
                ty = ir.VectorType(f32, width)
                mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
                undef, first = ir.Constant(ty, None), ir.Constant(ir.IntType(32), 0)
                k, c = (builder.shuffle_vector(builder.insert_element(undef, args[i], first), undef, mask) for i in (1, 2))
            else:
                ty, k, c = f32, args[1], args[2]
            with cgutils.for_range_slice(builder, start, stop, ir.Constant(i64, step)) as (i, _):
                src_at = builder.bitcast(builder.gep(a_src.data, [i], source_etype=f32), ty.as_pointer())
                dst_at = builder.bitcast(builder.gep(a_dst.data, [i], source_etype=f32), ty.as_pointer())
                v = builder.load(src_at, align=4)
                builder.store(_exp_ir(builder, builder.fsub(builder.fmul(v, k), c)), dst_at, align=4)
        return context.get_dummy_value()

    return types.void(src, scale, shift, dst), codegen


@njit(**_opts)
def exp_into(src, scale, shift, dst):
    """dst = exp(src * scale - shift), element-wise (see _exp_into)."""
    _exp_into(src, np.float32(scale), np.float32(shift), dst)


@njit(**_opts)
def dot(a, b):
    """sum a[i] * b[i] in _dot_lanes' fixed order. a: f32, or u16 fp16 bits; b: f32; both
    1-D contiguous."""
    return _dot_lanes(a, b)


# --- activations ------------------------------------------------------------------------


@njit(**_opts)
def quantize_q80(x, out):
    """x: (T, n) f32 -> out: (T, n // 32, 34) u8 Q80 blocks of activations, as llama.cpp's x86
    quantize_row_q8_0 makes them for its Q4_0/Q8_0 products (the twin:
    quant.quantize_q80_activations)."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // BLOCK):
            amax = np.float32(0.0)
            for j in range(BLOCK):
                amax = max(amax, abs(x[t, b * BLOCK + j]))
            d = np.float32(amax / np.float32(127.0))
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            if inv == np.inf:  # amax below ~4e-37: its fp16 scale is 0, the codes too
                inv = np.float32(0.0)
            bits = f32_to_f16_bits(d)
            out[t, b, 0] = bits & 0xFF
            out[t, b, 1] = bits >> 8
            for j in range(BLOCK):
                q = np.rint(np.float32(x[t, b * BLOCK + j] * inv))
                out[t, b, 2 + j] = np.uint8(np.int64(q) & 0xFF)


@njit(**_opts)
def q80_values(blocks, x):
    """Q80 blocks (T, nb, 34) -> their values x (T, nb * 32) f32."""
    q = blocks.view(np.int8)
    for t in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            d = f16_bits_to_f32(np.uint16(blocks[t, b, 0]) | (np.uint16(blocks[t, b, 1]) << 8))
            for j in range(BLOCK):
                x[t, b * BLOCK + j] = np.float32(q[t, b, 2 + j]) * d


# --- matrix products: out (T, rows) = x (T, cols) @ w.T, on this rank's rows -------------
# Each product is a serial `*_rows(r0, r1, c, ...)` kernel for rows [r0, r1) (c: the chunk,
# whose scratch the quantized ones use), called directly for small matrices (no
# parallel-region launch) and, through its `matmul_*` driver, on row chunks in parallel:
# the same code computes every row either way.


@njit(**_opts)
def f32_rows(r0, r1, c, w, x, out):
    """w: (rows, n) f32."""
    for r in range(r0, r1):
        for t in range(x.shape[0]):
            out[t, r] = dot(w[r], x[t])


@njit(**_opts)
def f16_rows(r0, r1, c, w, x, out):
    """w: (rows, n) u16 fp16 bits (decoded inside dot)."""
    for r in range(r0, r1):
        for t in range(x.shape[0]):
            out[t, r] = dot(w[r], x[t])


@njit(parallel=True, **_opts)
def matmul_f32(w, x, out):
    chunks = min(w.shape[0], CHUNKS)
    for c in prange(chunks):
        f32_rows(c * w.shape[0] // chunks, (c + 1) * w.shape[0] // chunks, c, w, x, out)


@njit(parallel=True, **_opts)
def matmul_f16(w, x, out):
    chunks = min(w.shape[0], CHUNKS)
    for c in prange(chunks):
        f16_rows(c * w.shape[0] // chunks, (c + 1) * w.shape[0] // chunks, c, w, x, out)


PARALLEL = {f32_rows: matmul_f32, f16_rows: matmul_f16, **qmatmul.PARALLEL}  # each rows kernel's parallel driver


# a mixture of experts' products of float weights, as qmatmul's experts_* (see there)
@njit(parallel=True, **_opts)
def experts_f32(used, starts, per_expert, w, x, out):
    chunks = qmatmul.expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        f32_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, w[w0 : w0 + per_expert], x[a:b], out[a:b])


@njit(parallel=True, **_opts)
def experts_f16(used, starts, per_expert, w, x, out):
    chunks = qmatmul.expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        f16_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, w[w0 : w0 + per_expert], x[a:b], out[a:b])


EXPERTS = {f32_rows: experts_f32, f16_rows: experts_f16, **qmatmul.EXPERTS}  # each rows kernel's experts driver


@njit(parallel=True, fastmath=True, **_opts)
def read_sum(buf):
    """Sum of buf (f64): the memory read-bandwidth probe of the benchmark. fastmath lets each
    thread keep several vector accumulators: in order, one add's latency per element bounds it
    below the bandwidth it is there to measure (its sum's bits don't matter)."""
    total = 0.0
    for i in prange(buf.shape[0]):
        total += buf[i]
    return total


def f16_bits(stored: np.ndarray) -> np.ndarray:
    """Stored f16 rows -> the u16 bits f16 kernels take (numba has no float16 on the CPU)."""
    return stored.view(np.uint16)


@njit(**_opts)
def f16_row(bits, out):
    """fp16 bits (cols,) -> out (cols,) f32 (numba has no float16 on the CPU: f16 weights
    stay 2 bytes as their bits)."""
    for i in range(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])


# --- element-wise and per-head -----------------------------------------------------------


@njit(**_opts)
def rmsnorm(x, weight, eps, out):
    """Each row of x (T, n) -> out (T, n)."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        ss = dot(x[t], x[t])
        scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + np.float32(eps)))
        for i in range(n):
            out[t, i] = weight[i] * (scale * x[t, i])


@njit(**_opts)
def rmsnorm_heads(vec, head_dim, weight, eps):
    """In place, RMSNorm of each head: vec (T, n_heads * head_dim), weight (head_dim,)."""
    for t in range(vec.shape[0]):
        for h in range(vec.shape[1] // head_dim):
            base = h * head_dim
            head = vec[t, base : base + head_dim]
            ss = dot(head, head)
            scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(head_dim) + np.float32(eps)))
            for i in range(head_dim):
                vec[t, base + i] = weight[i] * (scale * vec[t, base + i])


@njit(**_opts)
def rope(vec, head_dim, cos, sin):
    """In place, rotate interleaved pairs (vec[t, 2i], vec[t, 2i+1]) of each head of token t by
    that token's angles. vec: (T, n_heads * head_dim); cos, sin: (T, head_dim // 2)."""
    for t in range(vec.shape[0]):
        for h in range(vec.shape[1] // head_dim):
            base = h * head_dim
            for i in range(head_dim // 2):
                a = vec[t, base + 2 * i]
                b = vec[t, base + 2 * i + 1]
                vec[t, base + 2 * i] = a * cos[t, i] - b * sin[t, i]
                vec[t, base + 2 * i + 1] = a * sin[t, i] + b * cos[t, i]


# --- the KV cache (quant.KV_TYPES) and attention ------------------------------------------
# A cache holds, per layer, codes (n_slots, n_local_kv, max_seq, head_dim) of the type's
# code dtype and fp16 scale bits (n_slots, n_local_kv, max_seq, scales per row; 0 wide for
# unscaled types): a KV head's positions are contiguous, so attention reads them as one
# stream the hardware prefetches (positions outermost, a head's rows 1 KiB apart in a
# Llama-3.2-1B layer, took 2x the time at depth 8192). kv_encode and kv_decode are chosen by
# the codes' dtype when a kernel compiles: f32 values, u16 fp16 bits, or int8 codes with a
# scale per block.


@njit(**_opts)
def f32_to_f16_bits_signed(bits):
    """fp16 bits of the f32 whose bits (u32) are given, rounded to nearest even, as numpy's
    float32 -> float16 (npy_floatbits_to_halfbits): overflow to inf, NaN kept NaN, tiny to
    a signed zero or a subnormal."""
    f = np.uint32(bits)
    sign = np.uint32((f & np.uint32(0x80000000)) >> np.uint32(16))
    f_exp = f & np.uint32(0x7F800000)
    f_sig = f & np.uint32(0x007FFFFF)
    if f_exp >= np.uint32(0x47800000):  # beyond fp16's range, inf or NaN
        if f_exp == np.uint32(0x7F800000) and f_sig != 0:
            nan = np.uint32(0x7C00) + (f_sig >> np.uint32(13))
            return np.uint16(sign + (nan + np.uint32(1) if nan == np.uint32(0x7C00) else nan))
        return np.uint16(sign + np.uint32(0x7C00))
    if f_exp <= np.uint32(0x38000000):  # a subnormal half, or zero
        if f_exp < np.uint32(0x33000000):
            return np.uint16(sign)
        e = f_exp >> np.uint32(23)
        sig = (np.uint32(0x00800000) + f_sig) >> (np.uint32(113) - e)
        if (sig & np.uint32(0x3FFF)) != np.uint32(0x1000) or (f & np.uint32(0x7FF)) != 0:
            sig += np.uint32(0x1000)
        return np.uint16(sign + (sig >> np.uint32(13)))
    h_exp = (f_exp - np.uint32(0x38000000)) >> np.uint32(13)
    if (f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000):
        f_sig += np.uint32(0x1000)
    return np.uint16(sign + h_exp + (f_sig >> np.uint32(13)))  # a carry into the exponent is right


@intrinsic
def _f16_into(typingctx, bits, dst):
    """dst[i] = the f32 of fp16 bits[i] (exact), over 1-D contiguous arrays of one length,
    8 lanes at a time and the tail one by one (as _f16_ir: no F16C needed)."""
    if not (isinstance(bits, types.Array) and isinstance(dst, types.Array) and bits.ndim == dst.ndim == 1
            and bits.layout == dst.layout == "C" and bits.dtype == types.uint16 and dst.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        i16, f32, i64 = ir.IntType(16), ir.FloatType(), ir.IntType(64)
        a_src, a_dst = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        n = cgutils.unpack_tuple(builder, a_src.shape)[0]
        whole = builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8))
        for src_ty, dst_ty, start, stop, step in ((ir.VectorType(i16, 8), ir.VectorType(f32, 8), ir.Constant(i64, 0), whole, 8),
                                                  (i16, f32, whole, n, 1)):
            with cgutils.for_range_slice(builder, start, stop, ir.Constant(i64, step)) as (i, _):
                src_at = builder.bitcast(builder.gep(a_src.data, [i], source_etype=i16), src_ty.as_pointer())
                dst_at = builder.bitcast(builder.gep(a_dst.data, [i], source_etype=f32), dst_ty.as_pointer())
                builder.store(_f16_ir(builder, builder.load(src_at, align=2)), dst_at, align=4)
        return context.get_dummy_value()

    return types.void(bits, dst), codegen


@intrinsic
def _scaled_i8_into(typingctx, codes, scale, dst):
    """dst[i] = f32(codes[i]) * scale over 1-D contiguous arrays of one length (int8, f32), 8
    lanes at a time and the tail one by one: one exact conversion and one multiply each."""
    if not (isinstance(codes, types.Array) and isinstance(dst, types.Array) and codes.ndim == dst.ndim == 1
            and codes.layout == dst.layout == "C" and codes.dtype == types.int8 and dst.dtype == types.float32
            and scale == types.float32):
        return None

    def codegen(context, builder, sig, args):
        i8, f32, i64 = ir.IntType(8), ir.FloatType(), ir.IntType(64)
        a_src, a_dst = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2))
        n = cgutils.unpack_tuple(builder, a_src.shape)[0]
        whole = builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8))
        undef = ir.Constant(ir.VectorType(f32, 8), None)
        lanes = builder.shuffle_vector(builder.insert_element(undef, args[1], ir.Constant(ir.IntType(32), 0)), undef,
                                       ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        for src_ty, dst_ty, k, start, stop, step in ((ir.VectorType(i8, 8), ir.VectorType(f32, 8), lanes, ir.Constant(i64, 0),
                                                      whole, 8), (i8, f32, args[1], whole, n, 1)):
            with cgutils.for_range_slice(builder, start, stop, ir.Constant(i64, step)) as (i, _):
                src_at = builder.bitcast(builder.gep(a_src.data, [i], source_etype=i8), src_ty.as_pointer())
                dst_at = builder.bitcast(builder.gep(a_dst.data, [i], source_etype=f32), dst_ty.as_pointer())
                builder.store(builder.fmul(builder.sitofp(builder.load(src_at, align=1), dst_ty), k), dst_at, align=4)
        return context.get_dummy_value()

    return types.void(codes, scale, dst), codegen


def kv_encode(x, codes, scales):
    """One head's row x (head_dim,) f32 -> its codes (head_dim,) and scale bits (n,) in the
    cache's type (compiled per codes dtype; twins: quant.KV_TYPES[...].encode)."""


def kv_decode(codes, scales, p0, n, tile):
    """One KV head's rows at positions p0 .. p0 + n - 1, of its codes (max_seq, head_dim) and
    scale bits (max_seq, k) -> tile[:n] f32 (twins: quant.KV_TYPES[...].decode)."""


@overload(kv_encode, jit_options=_opts)
def _kv_encode(x, codes, scales):
    if codes.dtype == types.float32:
        def encode_f32(x, codes, scales):
            codes[:] = x
        return encode_f32
    if codes.dtype == types.uint16:
        def encode_f16(x, codes, scales):
            bits = x.view(np.uint32)
            for i in range(x.shape[0]):
                codes[i] = f32_to_f16_bits_signed(bits[i])
        return encode_f16
    if codes.dtype == types.int8:
        def encode_q80(x, codes, scales):  # each block as quantize_q80 (llama.cpp's x86 quantize_row_q8_0)
            block = x.shape[0] // scales.shape[0]
            for b in range(scales.shape[0]):
                amax = np.float32(0.0)
                for j in range(b * block, (b + 1) * block):
                    amax = max(amax, abs(x[j]))
                inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
                if inv == np.inf:
                    inv = np.float32(0.0)
                scales[b] = f32_to_f16_bits(np.float32(amax / np.float32(127.0)))
                for j in range(b * block, (b + 1) * block):
                    codes[j] = np.int8(np.rint(np.float32(x[j] * inv)))
        return encode_q80
    return None


@overload(kv_decode, jit_options=_opts)
def _kv_decode(codes, scales, p0, n, tile):
    if codes.dtype == types.float32:
        def decode_f32(codes, scales, p0, n, tile):
            for p in range(n):
                tile[p] = codes[p0 + p]
        return decode_f32
    if codes.dtype == types.uint16:
        def decode_f16(codes, scales, p0, n, tile):
            for p in range(n):
                _f16_into(codes[p0 + p], tile[p])
        return decode_f16
    if codes.dtype == types.int8:
        def decode_q80(codes, scales, p0, n, tile):
            n_scales = scales.shape[1]
            block = codes.shape[1] // n_scales
            for p in range(n):
                for b in range(n_scales):
                    lo, hi = b * block, (b + 1) * block
                    _scaled_i8_into(codes[p0 + p, lo:hi], f16_bits_to_f32(scales[p0 + p, b]), tile[p, lo:hi])
        return decode_q80
    return None


@njit(**_opts)
def store_kv(k, v, slots, positions, k_codes, k_scales, v_codes, v_scales):
    """Row t's keys and values (T, n_local_kv * head_dim) f32, one head at a time, into its
    slot at its position, in the cache's type."""
    n_kv, head_dim = k_codes.shape[1], k_codes.shape[3]
    for t in range(k.shape[0]):
        s, p = slots[t], positions[t]
        for j in range(n_kv):
            kv_encode(k[t, j * head_dim : (j + 1) * head_dim], k_codes[s, j, p], k_scales[s, j, p])
            kv_encode(v[t, j * head_dim : (j + 1) * head_dim], v_codes[s, j, p], v_scales[s, j, p])


ATT_BLOCK = 64  # positions per online-softmax step: their keys and values decoded once, into f32 tiles


@intrinsic
def _exp_scalar(typingctx, x):
    """exp(x) of an f32, as _exp_ir (the bits exp_into gives)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _exp_ir(builder, args[0])

    return types.float32(x), codegen


def attention_scratch(n_heads: int, head_dim: int, n_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """attention's scratch for n_chunks chunks (the rank's threads: one chunk each): key and value
    tiles (n_chunks, 2, ATT_BLOCK, head_dim), scores (n_chunks, n_heads, ATT_BLOCK), and each
    head's running max and sum and whether the task has it (n_chunks, n_heads, 3)."""
    f32 = np.float32
    return (np.zeros((n_chunks, 2, ATT_BLOCK, head_dim), f32), np.zeros((n_chunks, n_heads, ATT_BLOCK), f32),
            np.zeros((n_chunks, n_heads, 3), f32))


@njit(**_opts)
def attention_chunk(c, n_chunks, q, k_codes, k_scales, v_codes, v_scales, kv_of_head, slots, positions, tiles, scores,
                    state, out):
    """Causal attention, flash-attention style, of the tasks c, c + n_chunks, ... of T x n_kv x
    parts: task (t, j, part) is row t (of sequence slot slots[t], at position positions[t]) over
    its slot's positions [0, positions[t]], for the local query heads h reading KV head j
    (kv_of_head[h] == j) whose index among them is part modulo parts. parts is 1 unless there
    are fewer rows x KV heads than chunks (decoding on a rank that holds one or two KV heads):
    then a KV head's query heads are shared out, so that every thread has work. Positions go
    in blocks of ATT_BLOCK from 0: a block's keys and values are decoded once into f32 tiles
    (each KV row is read once per task, whatever the group size), each head's scores over the
    block, then its running max, sum and output are rescaled (online softmax).
    q: (T, n_local_heads, head_dim); the caches (see above) already hold the rows' keys and
    values; out: (T, n_local_heads, head_dim). Block bounds
    depend on the position only, so a row's result never depends on T, the split or the
    thread count. tiles, scores, state: attention_scratch's, chunk c's row used."""
    n_tok, n_heads, head_dim = q.shape
    n_kv = k_codes.shape[1]
    inv_sqrt = np.float32(1.0 / math.sqrt(head_dim))
    k_tile, v_tile, s, st = tiles[c, 0], tiles[c, 1], scores[c], state[c]
    parts = 1
    if 0 < n_tok * n_kv < n_chunks:  # a rank may hold no head at all
        largest_group = 0
        for j in range(n_kv):
            size = 0
            for h in range(n_heads):
                size += kv_of_head[h] == j
            largest_group = max(largest_group, size)
        parts = max(1, min(largest_group, n_chunks // (n_tok * n_kv)))
    for task in range(c, n_tok * n_kv * parts, n_chunks):
        t, j, part = task // (n_kv * parts), (task // parts) % n_kv, task % parts
        slot, n_pos = slots[t], positions[t] + 1
        mine = st[:, 2]  # 1 where head h is this task's
        k = 0
        for h in range(n_heads):
            mine[h] = 0.0
            if kv_of_head[h] == j:
                if k % parts == part:
                    mine[h] = 1.0
                    st[h, 0], st[h, 1] = -np.inf, 0.0  # running max, running sum
                    out[t, h] = 0.0
                k += 1
        for p0 in range(0, n_pos, ATT_BLOCK):
            n = min(ATT_BLOCK, n_pos - p0)
            kv_decode(k_codes[slot, j], k_scales[slot, j], p0, n, k_tile)
            kv_decode(v_codes[slot, j], v_scales[slot, j], p0, n, v_tile)
            for h in range(n_heads):
                if mine[h] == 0.0:
                    continue
                row, o = s[h, :n], out[t, h]
                top = st[h, 0]
                for p in range(n):
                    row[p] = dot(k_tile[p], q[t, h]) * inv_sqrt
                    top = max(top, row[p])
                exp_into(row, np.float32(1), top, row)
                total = st[h, 1]
                if top > st[h, 0]:  # a new max: what came before shrinks by exp(old - new)
                    alpha = _exp_scalar(np.float32(st[h, 0] - top))
                    total *= alpha
                    for i in range(head_dim):
                        o[i] *= alpha
                for p in range(n):
                    total += row[p]
                for p in range(n):
                    w, v = row[p], v_tile[p]
                    for i in range(head_dim):  # element-wise: vectorizes in any order, the same bits
                        o[i] += w * v[i]
                st[h, 0], st[h, 1] = top, total
        for h in range(n_heads):
            if mine[h] != 0.0:
                o, total = out[t, h], st[h, 1]
                for i in range(head_dim):
                    o[i] /= total


@njit(parallel=True, **_opts)
def attention(q, k_codes, k_scales, v_codes, v_scales, kv_of_head, slots, positions, tiles, scores, state, out):
    """attention_chunk over the scratch's chunks, one per thread (attention_scratch)."""
    n_chunks = tiles.shape[0]
    for c in prange(n_chunks):
        attention_chunk(c, n_chunks, q, k_codes, k_scales, v_codes, v_scales, kv_of_head, slots, positions, tiles,
                        scores, state, out)


@njit(**_opts)
def silu_mul(h13, out):
    """out = silu(h1) * h3 where each token's row of h13 (T, 2n) is h1 (n) then h3 (n);
    out: (T, n)."""
    n = out.shape[1]
    for t in range(h13.shape[0]):
        h, o = h13[t], out[t]
        exp_into(h[:n], np.float32(-1), np.float32(0), o)
        for i in range(n):
            o[i] = h[i] / (np.float32(1.0) + o[i]) * h[n + i]


@njit(**_opts)
def route(logits, n_used, normalize, chosen, weights, order, rows, starts, used):
    """A mixture of experts' routing of T rows, llama.cpp's algorithm (not its bits): softmax
    over every expert's router logit (f32, experts in order), the n_used largest logits (a tie:
    the lower expert first; llama.cpp ranks the probabilities, the same order but where two
    logits round to one probability), their probabilities, divided by their sum (at least
    llama.cpp's 2**-14) when `normalize`.
    logits (T, E) f32 -> chosen (T, k) i64, weights (T, k) f32. Then the step's (row, choice)
    pairs expert by expert, so each chosen expert's weights are read once per step: order
    (T k,) the pairs t k + j, experts ascending, rows ascending within one; rows (T k,) their
    row t; starts (E + 1,) each expert's first index in order. Returns the number of experts
    chosen by any row, listed ascending in used (E,)."""
    n_tok, n_exp = logits.shape
    for t in range(n_tok):
        top = logits[t, 0]
        for e in range(1, n_exp):
            top = max(top, logits[t, e])
        total = np.float32(0)
        for e in range(n_exp):
            total += np.float32(math.exp(logits[t, e] - top))
        picked = np.float32(0)
        for j in range(n_used):
            best = -1
            for e in range(n_exp):
                taken = False
                for i in range(j):
                    taken = taken or chosen[t, i] == e
                if not taken and (best < 0 or logits[t, e] > logits[t, best]):
                    best = e
            chosen[t, j] = best
            weights[t, j] = np.float32(math.exp(logits[t, best] - top)) / total
            picked += weights[t, j]
        if normalize:
            picked = max(picked, np.float32(6.103515625e-05))  # as llama.cpp's clamp of the sum
            for j in range(n_used):
                weights[t, j] = weights[t, j] / picked
    starts[:] = 0
    for t in range(n_tok):
        for j in range(n_used):
            starts[chosen[t, j] + 1] += 1
    n_chosen = 0
    for e in range(n_exp):
        if starts[e + 1]:
            used[n_chosen] = e
            n_chosen += 1
        starts[e + 1] += starts[e]
    for e in range(n_exp):  # each expert's next free index, from its start
        used_to = starts[e]
        for t in range(n_tok):
            for j in range(n_used):
                if chosen[t, j] == e:
                    order[used_to], rows[used_to] = t * n_used + j, t
                    used_to += 1
    return n_chosen


@njit(**_opts)
def combine_experts(y, order, weights, out):
    """out[t] = sum over j of weights[t, j] * (the output of row t's j-th expert), j in order
    (as llama.cpp adds them), whatever the order the experts ran in.
    y (T k, n): the experts' outputs in route's order; out (T, n)."""
    n_used = weights.shape[1]
    for t in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[t, c] = np.float32(0)
    for j in range(n_used):
        for i in range(order.shape[0]):
            if order[i] % n_used == j:
                t = order[i] // n_used
                w = weights[t, j]
                for c in range(out.shape[1]):
                    out[t, c] = out[t, c] + w * y[i, c]


@njit(**_opts)
def sample(logits, temperature, top_p, coin, probs, scratch):
    """Greedy when temperature == 0 (the first largest logit). Otherwise the nucleus
    distribution (`distribution`: softmax(logits / temperature) in float64, every token whose
    probability reaches that of the smallest member of the top-p set); the token is where
    the coin falls in it, in index order (`pick`)."""
    if temperature == 0:
        best = 0
        for i in range(1, logits.shape[0]):
            if logits[i] > logits[best]:
                best = i
        return best
    distribution(logits, temperature, top_p, probs, scratch)
    return pick(probs, coin)


@njit(**_opts)
def mask_logits(logits, words):
    """logits[i] = -inf wherever bit i of the bitmask `words` (int32, little-endian bits, 32 a
    word) is clear: the tokens a grammar forbids (serving.constraints)."""
    n = logits.shape[0]
    for w in range(words.shape[0]):
        word = words[w]
        end = min(w * 32 + 32, n)
        if word == -1:  # all 32 allowed
            continue
        if word == 0:  # none: most words of a grammar's mask
            logits[w * 32 : end] = -np.inf
            continue
        for i in range(w * 32, end):
            if ((word >> (i & 31)) & 1) == 0:
                logits[i] = -np.inf


@njit(**_opts)
def row_argmax(x, offset, out):
    """Per row of x (m, n): out[i] = (its largest value, offset + the first index holding it),
    as f32 (an index below 2**24 is exact): a rank's part of a greedy choice."""
    for i in range(x.shape[0]):
        best = 0
        for j in range(1, x.shape[1]):
            if x[i, j] > x[i, best]:
                best = j
        out[i, 0] = x[i, best]
        out[i, 1] = offset + best


@njit(**_opts)
def pick_best(parts, out):
    """out[i] = the token of the largest value among the ranks' (value, token) parts[:, i]
    (size, m, 2), the first rank's on a tie: with the ranks' vocabulary spans in order, the
    first largest logit's token, as `sample` picks at temperature 0."""
    for i in range(parts.shape[1]):
        best = 0
        for r in range(1, parts.shape[0]):
            if parts[r, i, 0] > parts[best, i, 0]:
                best = r
        out[i] = np.int64(parts[best, i, 1])


@njit(**_opts)
def distribution(logits, temperature, top_p, probs, scratch):
    """What `sample` draws from at temperature > 0, into probs (float64, summing to 1):
    softmax(logits / temperature) kept to the nucleus (sample's cut) and renormalised. The
    speculative acceptance rule compares it with a draft's (sampler.Sampler.verify)."""
    n = logits.shape[0]
    best = 0
    for i in range(1, n):
        if logits[i] > logits[best]:
            best = i
    top = np.float64(logits[best])
    total = 0.0
    for i in range(n):
        probs[i] = math.exp((np.float64(logits[i]) - top) / temperature)
        total += probs[i]
    for i in range(n):
        probs[i] /= total
    cut = 0.0
    if top_p < 1:
        scratch[:] = probs
        scratch.sort()
        cum = 0.0
        for i in range(n - 1, -1, -1):
            cum += scratch[i]
            if cum >= top_p:
                cut = scratch[i]
                break
    kept = 0.0
    for i in range(n):
        if probs[i] >= cut:
            kept += probs[i]
        else:
            probs[i] = 0.0
    for i in range(n):
        probs[i] /= kept


@njit(**_opts)
def pick(probs, coin):
    """The index where coin * sum(probs) falls in probs' running sum, in index order (as
    `sample` picks); the last nonzero index when rounding leaves coin past the end."""
    total = 0.0
    for i in range(probs.shape[0]):
        total += probs[i]
    target = coin * total
    cdf = 0.0
    last = 0
    for i in range(probs.shape[0]):
        if probs[i] > 0:
            cdf += probs[i]
            last = i
            if target < cdf:
                return i
    return last


@njit(**_opts)
def residual(p, q, out):
    """out = max(0, p - q): where a token drafted from q and rejected is resampled from
    (after normalising; pick does). Returns its mass; where that is 0 (p == q up to rounding),
    out = p."""
    mass = 0.0
    for i in range(p.shape[0]):
        d = p[i] - q[i]
        out[i] = d if d > 0 else 0.0
        mass += out[i]
    if mass <= 0:
        out[:] = p
        mass = 1.0
    return mass


def rope_table(freqs: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (n_pos, head_dim // 2) f32, of angle p * freqs[i] (spec.rope_freqs()).
    Computed in float64 once, so every rank and the reference share the same table."""
    angles = np.outer(np.arange(n_pos, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def cache_dir() -> str:
    """Where numba keeps the compiled kernels."""
    return matmul_f32._cache.cache_path


def warm_up(weight_types: tuple[str, ...] = (), kv_types: tuple[str, ...] = (quant.DEFAULT_KV_TYPE,),
            experts: bool = False) -> None:
    """Compile (or load from numba's cache) every kernel the engine uses: the products of the
    types the converter can make from any source always, of the others (the k-quants, kept from
    GGUF files) only among `weight_types`, the model's: most models have none, and compiling
    them costs seconds on a cold cache; the attention of the KV cache types `kv_types`; with
    `experts`, a mixture of experts' routing and its products' drivers."""
    f32 = np.float32
    x = np.linspace(-1, 1, 64).astype(f32).reshape(1, 64)
    blocks, out = np.zeros((1, 2, 34), np.uint8), np.zeros((1, 64), f32)
    xq, xsum, xd = np.zeros((1, 512), np.int8), np.zeros((1, 16), np.int32), np.zeros((1, 16), f32)
    xt = np.zeros((1, 512), f32)
    quantize_q80(x, blocks)
    qmatmul.pack_q80(blocks, xq, xsum, xd)
    q80_values(blocks, out)
    qmatmul.pack_f32(x, xt)
    lanes = (np.zeros((CHUNKS, 16), np.int32), np.zeros((CHUNKS, 16), f32))
    products = []
    for t in quant.WEIGHTS.values():
        if t.encode is None and t.name not in weight_types:
            continue
        k = t.kernels
        if t.layout is None:  # float values: (3, 64) as the kernels hold them
            stored = np.ones((3, 64), t.dtype)
            w = resolve(k.pack)(stored) if k.pack else stored
            products.append((resolve(k.rows_f32), (w, x)))
            if k.row:
                resolve(k.row)(w[0], out[0])
            continue
        # one lane group of two blocks' codes and zero scales, in the layout's dtypes
        qs = np.zeros((3, t.layout.code_bytes), t.layout.packed[0])
        wd = np.zeros((3, t.layout.scale_bytes), np.uint8).view(t.layout.packed[1])
        products += [(resolve(k.rows_8bit), (qs, wd, xq, xsum, xd, *lanes)), (resolve(k.rows_f32), (qs, wd, xt, *lanes))]
        resolve(k.row)(qs[0], wd[0], 2, out[0])
        if pack := quant.ACTIVATIONS[t.activation].pack:
            resolve(pack)(np.zeros((1, quant.ACTIVATIONS[t.activation].block_values), f32), xq, xsum, xd)
    one = np.ones(1, np.int64)
    for serial, args in products:
        PARALLEL[serial](*args, out[:, :3])
        serial(0, 3, 0, *args, out[:, :3])
        if experts:  # expert 0 of one, its rows 0..2, on token 0
            EXPERTS[serial](one - 1, np.array([0, 1]), 3, *args, out[:, :3])
    if experts:
        logits = x[:, :4].copy()
        chosen, weights, order = np.zeros((1, 2), np.int64), np.zeros((1, 2), f32), np.zeros(2, np.int64)
        route(logits, 2, True, chosen, weights, order, order.copy(), np.zeros(5, np.int64), np.zeros(4, np.int64))
        combine_experts(out[:2], order, weights, out[:1])
    rmsnorm(x, x[0], 1e-5, out)
    rmsnorm_heads(out, 32, x[0, :32], 1e-5)
    rope(out, 32, x[:, :16], x[:, :16])
    rows = np.zeros(1, np.int64)
    for name in kv_types:
        kv = quant.KV_TYPES[name]
        codes, scales = np.zeros((1, 1, 4, 32), kv.code_dtype), np.zeros((1, 1, 4, kv.scales_per_row(32)), np.uint16)
        store_kv(out[:, :32], out[:, :32], rows, rows, codes, scales, codes, scales)
        att = (out.reshape(1, 2, 32), codes, scales, codes, scales, np.zeros(2, np.int64), rows, rows + 1,
               *attention_scratch(2, 32, 1), out.reshape(1, 2, 32))
        attention(*att)
        attention_chunk(0, 1, *att)
    silu_mul(np.concatenate((x, x), axis=1), out)
    sample(x[0], 0.8, 0.9, 0.5, np.zeros(64), np.zeros(64))
    best = np.zeros((1, 2), f32)
    row_argmax(x, 0, best)
    pick_best(best.reshape(1, 1, 2), np.zeros(1, np.int64))
    probs = np.zeros(64)
    distribution(x[0], 0.8, 0.9, probs, np.zeros(64))
    pick(probs, 0.5)
    residual(probs, probs[::-1].copy(), np.zeros(64))
