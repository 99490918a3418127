"""Register-blocked SIMD loops that Numba's own code generation does not produce, written as
Numba intrinsics (LLVM IR built at compile time, so they inline into the kernels that call them
and are cached with them).

`nearest_tile(X, r0, n, CT, cn, best, s1, s2)`: for the n <= TILE_ROWS rows X[r0 : r0 + n] and
the centres given as panels of W (the lane count) transposed, CT (KP / W, D, W) with
CT[b, d, l] = c_{bW + l, d} (zero past the last centre), and their squared norms cn (KP,)
(padding +inf), the nearest centre by score s_k = cn_k - 2 x . c_k:
best[j] = argmin (ties to the lowest k), s1[j] its score and s2[j] the next lowest (inf when
K = 1), for j < n, scores computed in X's dtype.

The products x . c_k for W consecutive centres (a block) are W lanes of one vector: per feature
d, one vector load of the block's panel row CT[b, d], one broadcast of x_d per row and one FMA per row, for
four rows at a time whose accumulators stay in registers (W = 64 bytes of lanes: 8 AVX2 registers
or 4 AVX-512 ones). X is read as stored: BLAS on a tile of rows by K = 16 centres, D = 32, spent
longer packing the tile than multiplying it. Blocks are the outer loop and the tile's rows the
inner one, so a block of centres (a contiguous D x 64-byte panel: rows of a (D, K) transpose lie
K apart, and at K = 1024 float32 every one fell in the same L1 set) stays in L1 while every row
of the tile meets it.
Each row keeps per lane its lowest score, the block it came from and its next lowest score
(selects, no per-centre branch); after the last block one horizontal minimum per row gives the
label (the lowest index among the lanes at the minimum: the lane's own centre when it is the only
one, the usual case, which skips an integer reduction), its score and the next lowest score.

`transpose_centred(X, r0, n, m, out)`: out[p, i] = X[r0 + i, p] - m[p] on the whole tiles of
T x T (T = 32 bytes of lanes: 8 float32 or 4 float64), i < n - n % T and p < D - D % T; the caller
does the edges. Each tile is T vector loads along rows of X, log2(T) rounds of two-input shuffles
(each round swaps the off-diagonal blocks of half the size of the last) and T vector stores along
rows of out: Numba's element loop makes one scattered store per element. X is C-contiguous; out's
rows have unit stride.

`pow2(m)`: 2**m for an integer-valued float m in its type's normal exponent range, assembled in
the exponent bits in m's own width (Numba would widen the integer arithmetic to 64 bits, and a
view of a scratch array costs a compiled function of its own); it vectorises with the loop.

`max_nonnan(a, b)`: the larger of two floats known not to be NaN, as LLVM's maxnum (a vector max
once vectorised); Numba's `max` is a compare and select, and a select stored back onto the array
element it read becomes a conditional store, which vectorises as a masked store (microcoded on AMD).

Numba's on-disk cache keys a kernel on its own source file: after editing this module, touch the
modules whose kernels inline it (kmeans.py, cpu.py) or clear their cache, or they keep the old code.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

VECTOR_BYTES = 64  # lanes per block: 16 float32 or 8 float64
_NO_NAN = ("nnan",)  # scores are never NaN (rows are checked finite): minima as plain vector minima


def lanes(dtype):
    """W, the centres per block (CT's padding multiple) for rows of this NumPy dtype."""
    return VECTOR_BYTES // dtype.itemsize


def _splat(builder, vty, x):
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _vector_function(builder, name, vty, n_args, ret=None):
    suffix = "v%d%s" % (vty.count, "f32" if isinstance(vty.element, ir.FloatType) else "f64")
    fnty = ir.FunctionType(ret or vty, [vty] * n_args)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.{suffix}")


def _row_pointer(builder, arr, row):
    """Pointer to arr[row, 0] of a 2-D array with unit inner stride (the row stride in bytes: no
    division)."""
    offset = builder.mul(row, cgutils.unpack_tuple(builder, arr.strides)[0])
    raw = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [offset])
    return builder.bitcast(raw, arr.data.type)


def _rows_args(context, builder, sig, args):
    """(X's array, r0 and n as intp, D) of an intrinsic called as f(X, r0, n, ...)."""
    xa = context.make_array(sig.args[0])(context, builder, args[0])
    r0, n = (context.cast(builder, args[j], sig.args[j], types.intp) for j in (1, 2))
    return xa, r0, n, cgutils.unpack_tuple(builder, xa.shape)[1]


TILE_ROWS = 32  # rows whose running minima a tile keeps (3 vectors each: 6 KB), per block of centres


@intrinsic
def nearest_tile(typingctx, X, r0, n, CT, cn, best, s1, s2):
    """See the module docstring: rows X[r0 : r0 + n], n <= TILE_ROWS, into best/s1/s2[0 : n]."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype in (types.float32, types.float64)
            and isinstance(CT, types.Array) and CT.ndim == 3 and CT.dtype == X.dtype and CT.layout == "C"
            and isinstance(cn, types.Array) and cn.dtype == X.dtype and cn.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        _, _, _, CTv, cnv, bestv, s1v, s2v = args
        xty, _, _, cty, nty, bty, s1ty, s2ty = sig.args
        ety = context.get_data_type(xty.dtype)
        W = VECTOR_BYTES // context.get_abi_sizeof(ety)
        vty = ir.VectorType(ety, W)
        i32 = ir.IntType(32)
        ity = ir.VectorType(i32, W)
        intp = context.get_value_type(types.intp)
        xa, r0v, nv, D = _rows_args(context, builder, sig, args)
        ca = context.make_array(cty)(context, builder, CTv)
        na = context.make_array(nty)(context, builder, cnv)
        n_blocks = cgutils.unpack_tuple(builder, ca.shape)[0]
        fma = _vector_function(builder, "fma", vty, 3)
        vmin = _vector_function(builder, "vector.reduce.fmin", vty, 1, ety)
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        zero = ir.Constant(vty, [ir.Constant(ety, 0.0)] * W)
        infs = _splat(builder, vty, ir.Constant(ety, float("inf")))
        minus_two = _splat(builder, vty, ir.Constant(ety, -2.0))
        # Per row and lane l, over the blocks so far: the lowest score (min1), the block it came
        # from (at) and the next lowest score (min2) among the centres k = block * W + l.
        # Two copies, read from one and written to the other block by block: a store of a select
        # between a new value and the one loaded from the same place became a masked store, which
        # AMD's cores microcode (several times slower than the whole search).
        min1 = cgutils.alloca_once(builder, vty, size=2 * TILE_ROWS)
        min2 = cgutils.alloca_once(builder, vty, size=2 * TILE_ROWS)
        at = cgutils.alloca_once(builder, ity, size=2 * TILE_ROWS)
        accs = [cgutils.alloca_once(builder, vty) for _ in range(4)]
        with cgutils.for_range(builder, nv) as rows:
            builder.store(infs, builder.gep(min1, [rows.index]))
            builder.store(infs, builder.gep(min2, [rows.index]))
            builder.store(ir.Constant(ity, [0] * W), builder.gep(at, [rows.index]))

        def group(row, R, cbase, norms, block, src, dst):
            """Products of rows row .. row + R - 1 (of the tile) with one block, their state read at
            row offset src and written at dst."""
            xrows = [_row_pointer(builder, xa, builder.add(r0v, builder.add(row, const(j)))) for j in range(R)]
            for acc in accs[:R]:
                builder.store(zero, acc)
            with cgutils.for_range(builder, D) as features:
                d = features.index
                c = builder.load(builder.bitcast(builder.gep(cbase, [builder.mul(d, const(W))]), vty.as_pointer()), align=1)
                for j in range(R):
                    xb = _splat(builder, vty, builder.load(builder.gep(xrows[j], [d])))
                    builder.store(builder.call(fma, [xb, c, builder.load(accs[j])]), accs[j])
            for j in range(R):
                i, o = builder.add(src, builder.add(row, const(j))), builder.add(dst, builder.add(row, const(j)))
                scores = builder.call(fma, [minus_two, builder.load(accs[j]), norms])
                m1, m2 = builder.load(builder.gep(min1, [i])), builder.load(builder.gep(min2, [i]))
                lower = builder.fcmp_ordered("<", scores, m1)  # strict: an earlier block keeps a tie
                builder.store(builder.select(lower, m1, builder.select(builder.fcmp_ordered("<", scores, m2), scores,
                                                                       m2)), builder.gep(min2, [o]))
                builder.store(builder.select(lower, scores, m1), builder.gep(min1, [o]))
                builder.store(builder.select(lower, block, builder.load(builder.gep(at, [i]))), builder.gep(at, [o]))

        n_groups = builder.udiv(nv, const(4))
        with cgutils.for_range(builder, n_blocks) as blocks:
            k0 = builder.mul(blocks.index, const(W))
            cbase = builder.gep(ca.data, [builder.mul(k0, D)])
            norms = builder.load(builder.bitcast(builder.gep(na.data, [k0]), vty.as_pointer()), align=1)
            block = _splat(builder, ity, builder.trunc(blocks.index, i32))
            src = builder.mul(builder.and_(blocks.index, const(1)), const(TILE_ROWS))
            dst = builder.sub(const(TILE_ROWS), src)
            with cgutils.for_range(builder, n_groups) as groups:
                group(builder.mul(groups.index, const(4)), 4, cbase, norms, block, src, dst)
            with cgutils.for_range_slice(builder, builder.mul(n_groups, const(4)), nv, const(1)) as (row, _):
                group(row, 1, cbase, norms, block, src, dst)
        final = builder.mul(builder.and_(n_blocks, const(1)), const(TILE_ROWS))
        # Across lanes: the lowest score, the lowest centre index that has it, and the next lowest
        # score (the other lanes' minima and every lane's second).
        iota = ir.Constant(ity, list(range(W)))
        umin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [ity]),
                                              f"llvm.vector.reduce.umin.v{W}i32")
        mask_ty = ir.IntType(W)
        cttz = cgutils.get_or_insert_function(builder.module, ir.FunctionType(mask_ty, [mask_ty, ir.IntType(1)]),
                                              f"llvm.cttz.i{W}")
        k_slot = cgutils.alloca_once(builder, i32)
        outs = [(context.make_array(t)(context, builder, v), t) for t, v in ((bty, bestv), (s1ty, s1v), (s2ty, s2v))]
        with cgutils.for_range(builder, nv) as rows:
            i = rows.index
            f = builder.add(final, i)
            m1 = builder.load(builder.gep(min1, [f]))
            low = builder.call(vmin, [m1], fastmath=_NO_NAN)
            ks = builder.add(builder.mul(builder.load(builder.gep(at, [f])), _splat(builder, ity, ir.Constant(i32, W))),
                             iota)
            ties = builder.fcmp_ordered("==", m1, _splat(builder, vty, low))
            mask = builder.bitcast(ties, mask_ty)
            one_lane = builder.icmp_unsigned("==", builder.and_(mask, builder.sub(mask, ir.Constant(mask_ty, 1))),
                                             ir.Constant(mask_ty, 0))
            with builder.if_else(one_lane, likely=True) as (then, otherwise):
                with then:  # the usual case: one lane holds the minimum, its centre is the label
                    lane = builder.call(cttz, [mask, ir.Constant(ir.IntType(1), 0)])
                    builder.store(builder.extract_element(ks, lane), k_slot)
                with otherwise:  # several lanes tie: the lowest centre index among them
                    builder.store(builder.call(umin, [builder.select(ties, ks, _splat(builder, ity, ir.Constant(
                        i32, 2**31 - 1)))]), k_slot)
            k = builder.load(k_slot)
            lane = builder.and_(k, ir.Constant(i32, W - 1))
            others = builder.select(builder.icmp_unsigned("==", iota, _splat(builder, ity, lane)), infs, m1)
            m2 = builder.load(builder.gep(min2, [f]))
            second = builder.call(vmin, [builder.select(builder.fcmp_ordered("<", others, m2), others, m2)],
                                  fastmath=_NO_NAN)
            for (out, t), value, from_ty in zip(outs, (k, low, second), (types.int32, xty.dtype, xty.dtype)):
                builder.store(context.cast(builder, value, from_ty, t.dtype), builder.gep(out.data, [i]))
        return context.get_dummy_value()

    return types.void(X, r0, n, CT, cn, best, s1, s2), codegen


@intrinsic
def pow2(typingctx, m):
    if m not in (types.float32, types.float64):
        return None
    bits, bias = (32, 127) if m == types.float32 else (64, 1023)
    mantissa = 23 if m == types.float32 else 52

    def codegen(context, builder, sig, args):
        ity = ir.IntType(bits)
        e = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        return builder.bitcast(builder.shl(e, ir.Constant(ity, mantissa)), context.get_value_type(m))

    return m(m), codegen


@intrinsic
def max_nonnan(typingctx, a, b):
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(args[0].type, [args[0].type] * 2),
                                            "llvm.maxnum." + ("f32" if a == types.float32 else "f64"))
        return builder.call(fn, args, fastmath=_NO_NAN)

    return a(a, b), codegen


TRANSPOSE_BYTES = 32  # a tile row is one AVX2 register


@intrinsic
def transpose_centred(typingctx, X, r0, n, m, out):
    """See the module docstring."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype in (types.float32, types.float64)
            and X.layout == "C" and isinstance(m, types.Array) and m.ndim == 1 and m.dtype == X.dtype
            and isinstance(out, types.Array) and out.ndim == 2 and out.dtype == X.dtype):
        return None

    def codegen(context, builder, sig, args):
        mv, outv = args[3:]
        ety = context.get_data_type(X.dtype)
        size = context.get_abi_sizeof(ety)
        T = TRANSPOSE_BYTES // size
        vty = ir.VectorType(ety, T)
        intp = context.get_value_type(types.intp)
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        xa, r0v, nv, D = _rows_args(context, builder, sig, args)
        ma = context.make_array(m)(context, builder, mv)
        oa = context.make_array(out)(context, builder, outv)
        whole = lambda v: builder.mul(builder.udiv(v, const(T)), const(T))  # noqa: E731
        masks = []  # per round d: the shuffles giving rows j and j + d from rows j and j + d
        d = T // 2
        while d >= 1:
            lo = [c if c & d == 0 else T + c - d for c in range(T)]
            hi = [c + d if c & d == 0 else T + c for c in range(T)]
            masks.append((d, *(ir.Constant(ir.VectorType(ir.IntType(32), T), k) for k in (lo, hi))))
            d //= 2
        with cgutils.for_range_slice(builder, const(0), whole(nv), const(T)) as (i0, _):
            rows = [_row_pointer(builder, xa, builder.add(r0v, builder.add(i0, const(j)))) for j in range(T)]
            with cgutils.for_range_slice(builder, const(0), whole(D), const(T)) as (p0, _):
                v = [builder.load(builder.bitcast(builder.gep(r, [p0]), vty.as_pointer()), align=size) for r in rows]
                for d, lo, hi in masks:
                    for j in range(T):
                        if j & d == 0:
                            v[j], v[j + d] = (builder.shuffle_vector(v[j], v[j + d], lo),
                                              builder.shuffle_vector(v[j], v[j + d], hi))
                for j in range(T):
                    p = builder.add(p0, const(j))
                    centre = _splat(builder, vty, builder.load(builder.gep(ma.data, [p])))
                    dst = builder.gep(_row_pointer(builder, oa, p), [i0])
                    builder.store(builder.fsub(v[j], centre), builder.bitcast(dst, vty.as_pointer()), align=size)
        return context.get_dummy_value()

    return types.none(X, r0, n, m, out), codegen
