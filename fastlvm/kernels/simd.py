"""Register-blocked SIMD loops that Numba's own code generation does not produce, written as
Numba intrinsics (LLVM IR built at compile time, so they inline into the kernels that call them
and are cached with them).

`nearest_tile(X, r0, n, CT, cn, best, s1, s2)`: for the n <= TILE_ROWS rows X[r0 : r0 + n] and
the centres given as panels of W (the lane count) transposed and scaled by -2, CT (KP / W, D, W)
with CT[b, d, l] = -2 c_{bW + l, d} (zero past the last centre), and their squared norms cn (KP,)
(padding +inf), the nearest centre by score s_k = cn_k - 2 x . c_k:
best[j] = argmin (ties to the lowest k), s1[j] its score and s2[j] the next lowest (inf when
K = 1), for j < n, scores computed in X's dtype.

The scores for W consecutive centres (a block) are W lanes of one vector, accumulated from the
norms: per feature d, one vector load of the block's panel row CT[b, d], one broadcast of x_d per
row and one FMA per row (the -2 lies in the panels: no last FMA and no zeroing per row and block),
for R rows at a time whose accumulators stay in registers (W = 64 bytes of lanes: two AVX2
registers a row, R = 4; one AVX-512 register a row, R = 8; eight accumulators either way, the FMAs
in flight that two FMA units of four cycles' latency take; see VECTOR_BYTES). X is read as stored:
BLAS on a tile of rows by K = 16 centres, D = 32, spent longer packing the tile than multiplying it.
Blocks are the outer loop and the tile's rows the inner one, so a block of centres (a contiguous
D x 64-byte panel: rows of a (D, K) transpose lie K apart, and at K = 1024 float32 every one fell
in the same L1 set) stays in L1 while every row of the tile meets it. Each feature's FMAs come with
a prefetch of one cache line of the next tile's rows into L2 (X[r0 + n :], within X): rows beyond
the cache otherwise kept the search waiting on memory.
A block's scores go to a small buffer, a W-lane vector per row; read back T rows by T centres
(T = 32 bytes of lanes) and transposed in registers, they put the rows in lanes, so the running
minimum, its centre and the next lowest score are vertical minima and selects over the centres in
order (ties keep the lowest index), with no per-row horizontal reduction: that had cost as long
as the products at K = 16, D = 32.

`transpose_centred(X, r0, n, m, out, squares)`: out[p, i] = X[r0 + i, p] - m[p], and when squares
has rows, squares[p, i] = out[p, i]^2 (from the registers: a second pass over out cost the diag
type a third as long as the transposition), on the whole tiles of T x T (T = 32 bytes of lanes: 8
float32 or 4 float64), i < n - n % T and p < D - D % T; the caller does the edges. Each tile is T
vector loads along rows of X, log2(T) rounds of two-input shuffles (single AVX instructions: see
_transpose_masks) and T vector stores along rows of out: Numba's
element loop makes one scattered store per element. X is C-contiguous; out's rows have unit
stride.

`combine_rows(C, A, base, out, upper)`: out[k, i] = base[k] + sum_p C[p, k] A[p, i] for k < K (C's
columns) and i < n (out's columns, a multiple of 2V, V = VECTOR_BYTES of lanes: 32 bytes, or 64 on
AVX-512 targets; A's rows may be longer): the E-step of the diag and spherical types (C their
weights) and the full and tied types' whitening (C = P_k, upper triangular: with `upper`, rows of R
outputs stop at p < k + R, the zeros below the diagonal beyond that not multiplied). Six rows of out
by 2V columns are twelve accumulators that stay in registers over every p (each load of A serves six
rows, each broadcast of C two vectors; with one broadcast live at a time, 15 of AVX2's 16
registers); the last rows four at a time, then one by one (see _blocks). Twelve leave half again the
FMAs in flight that two FMA units of four cycles' latency need: with eight, exactly that many, any
delay stalls them (a diag float32 pass took 1.06x as long on the AVX2 path). A loop over p with the
outputs in memory reloaded and stored them at every group of four p and spilled its coefficients
(1.3-1.4x as long on the diag type's shapes). The sum runs in order of p from base[k] (float64,
rounded to A's dtype; from zero when base is empty).

`row_dots(A, B, out, upper, P, lo, hi)`: out[a, b] += A[a] . B[b] for a < A's rows (a multiple of 2)
and b < B's rows (a multiple of 4), over A's columns, a multiple of V (as in combine_rows; B's rows
may be longer); out in A's dtype or float64; with `upper`, only the blocks that reach b >= a (a
block on the diagonal adds a few entries below it too): the M-step of every type (A the
responsibilities; with `upper`, the upper triangle of the full and tied types' symmetric second
moments). Three rows of A by four of B are twelve vector accumulators along the rows (B's rows
loaded one at a time, each live for three FMAs: 16 registers on AVX2, no spills), the last rows of A
two at a time (see _blocks; with `upper` all of them, fewer entries below the diagonal), with the
slack over the FMAs' latency that combine_rows has. The accumulators of two rows of A (float32: 8x8)
or of one (float64: 4x4), each folded to as many lanes, are transposed, so that each dot product
lies in one lane of their sum, added to out four at a time (a horizontal sum and a scalar update per
dot product before; a loop of eight scalar accumulators, which read B's rows from L2 for every two
rows of A, took 1.06-1.24x as long). Each step of the products also requests one cache line of the
bytes [lo, hi) of the C-contiguous array P into L2 (the next rows a caller will read; none when lo
>= hi): prefetches spread among FMAs arrive in time without stalling the core.

`prefetch(a, start, stop)`: a hint to load the cache lines of a[start:stop] (1-D; none for a negative
stride), one prefetch instruction per 64 bytes; no effect on results.

`pow2(m)`: 2**m for an integer-valued float m in its type's normal exponent range, assembled in
the exponent bits in m's own width (Numba would widen the integer arithmetic to 64 bits, and a
view of a scratch array costs a compiled function of its own); it vectorises with the loop
(float64 without a float-to-integer conversion, which AVX2 has only as scalar instructions).

`polynomial(x, c)`: c[0] + c[1] x + ... + c[n-1] x^(n-1) in x's dtype by Estrin's scheme: pairs
c[j] + c[j+1] x, then pairs of those with x^2, then x^4, ...: log2(n) rounds of independent FMAs
where Horner's rule chains n - 1 (the float64 exp's 12 coefficients: four dependent FMAs beside
three squarings instead of eleven FMAs in a row, so the loops that inline it keep more iterations
in flight; the normalisation, float64, 200k x 16 on the AVX2 path, 5.02 -> 4.54 ms).

`split_exponent(x)`: (e, f) with x = 2**e * f, f in [1, 2), e an integer-valued float, for a
positive normal float x, read from and written to the bits in x's own width as pow2 does; it
vectorises with the loop (libm's log does not).

`max_nonnan(a, b)`: the larger of two floats known not to be NaN, as LLVM's maxnum (a vector max
once vectorised); Numba's `max` is a compare and select, and a select stored back onto the array
element it read becomes a conditional store, which vectorises as a masked store (microcoded on AMD).

Numba's on-disk cache keys a kernel on its own source file: after editing this module, touch the
modules whose kernels inline it (kmeans.py, cpu.py, workers.py) or clear their cache, or they keep
the old code.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PANEL_BYTES = 64  # nearest_tile's block of centres: 16 float32 or 8 float64 lanes
_NO_NAN = ("nnan",)  # scores are never NaN (rows are checked finite): minima as plain vector minima


def target_has_avx512():
    """Whether Numba compiles for AVX-512F: NUMBA_CPU_FEATURES when set, else the host's features
    (what Numba's own target machine is given)."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return "+avx512f" in features.split(",")


# The registers the products accumulate in: 512 bits where the target has AVX-512 (32 of them), else
# 256 bits (AVX2's 16). Read when an intrinsic is compiled, so a kernel's width follows the target
# its cache entry is keyed on. With 256-bit vectors on an AVX-512 host the loops would run at half
# the FMA width BLAS has there; with 512-bit ones on AVX2 their accumulators would spill.
VECTOR_BYTES = 64 if target_has_avx512() else 32


def lanes(dtype):
    """W, the centres per block (CT's padding multiple) for rows of this NumPy dtype."""
    return PANEL_BYTES // dtype.itemsize


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


def _prefetch_line(builder, pointer, level):
    """A hint to load the cache line at `pointer` (any pointer) for reading into cache level `level`
    (1: L1, 2: L2); no effect on results, never a fault."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    # read (0), LLVM's locality 3 keeps the line in L1, 2 in L2; data (1)
    builder.call(fn, [builder.bitcast(pointer, i8p), ir.Constant(i32, 0), ir.Constant(i32, 4 - level),
                      ir.Constant(i32, 1)])


def _rows_args(context, builder, sig, args):
    """(X's array, r0 and n as intp, D) of an intrinsic called as f(X, r0, n, ...)."""
    xa = context.make_array(sig.args[0])(context, builder, args[0])
    r0, n = (context.cast(builder, args[j], sig.args[j], types.intp) for j in (1, 2))
    return xa, r0, n, cgutils.unpack_tuple(builder, xa.shape)[1]


TILE_ROWS = 32  # rows a tile takes per block of centres (their scores: 2 KB)
TRANSPOSE_BYTES = 32  # a transposed tile's row is one AVX2 register


def _transpose_masks(T):
    """The rounds (d, lo, hi) of a T x T transposition (T = 4 or 8), d = 1, 2, .., T / 2, and the
    order its outputs come in. Each shuffle is one AVX instruction: unpack within 128-bit lanes,
    then (T = 8) pairs of elements, then the lanes across rows (24 shuffles for 8 x 8 where
    swapping lanes first took 32)."""
    mask = lambda k: ir.Constant(ir.VectorType(ir.IntType(32), T), k)  # noqa: E731
    if T == 4:  # unpack, lanes
        rounds = [(1, [0, 4, 2, 6], [1, 5, 3, 7]), (2, [0, 1, 4, 5], [2, 3, 6, 7])]
        order = [0, 1, 2, 3]
    elif T == 8:  # unpack, pairs, lanes
        rounds = [(1, [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]),
                  (2, [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
                  (4, [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])]
        order = [0, 2, 1, 3, 4, 6, 5, 7]
    else:
        raise ValueError(f"no transposition of {T} x {T}")
    return [(d, mask(lo), mask(hi)) for d, lo, hi in rounds], order


def _transpose(builder, v, masks):
    """The T vectors v (rows of a T x T tile) transposed by the rounds of _transpose_masks: round d
    shuffles rows j and j + d (j & d == 0) into two new ones."""
    rounds, order = masks
    v = list(v)
    for d, lo, hi in rounds:
        for j in range(len(v)):
            if j & d == 0:
                v[j], v[j + d] = builder.shuffle_vector(v[j], v[j + d], lo), builder.shuffle_vector(v[j], v[j + d], hi)
    return [v[o] for o in order]


def _fold_halves(builder, v, T):
    """v's lanes summed down to T lanes: its upper half added to its lower half until T are left."""
    while v.type.count > T:
        half = v.type.count // 2
        lanes_from = lambda h: ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(h, h + half)))  # noqa: E731
        lo, hi = (builder.shuffle_vector(v, v, lanes_from(h)) for h in (0, half))
        v = builder.fadd(lo, hi)
    return v


def _vector_cast(builder, v, to):
    """Vector v with its elements converted to the scalar LLVM type `to` (widened or narrowed)."""
    vto = ir.VectorType(to, v.type.count)
    if v.type.element == to:
        return v
    if isinstance(to, ir.IntType):
        return (builder.sext if to.width > v.type.element.width else builder.trunc)(v, vto)
    wider = isinstance(to, ir.DoubleType)
    return (builder.fpext if wider else builder.fptrunc)(v, vto)


def _blocks(builder, n, big, small):
    """Rows 0..n cut into blocks of `big` rows, then of `small`, then single rows: (number of big
    blocks, number of small ones, start of the single rows). One big block is traded for smaller
    ones where that leaves fewer single rows (n = 8 in blocks of 6 and 4: 4, 4, not 6, 1, 1; n = 16
    in blocks of 3 and 2: 3, 3, 3, 3, 2, 2, not five 3s and a single row)."""
    const = lambda v: ir.Constant(n.type, v)  # noqa: E731
    n_big = builder.udiv(n, const(big))
    singles = builder.urem(builder.sub(n, builder.mul(n_big, const(big))), const(small))
    trade = builder.and_(builder.icmp_unsigned(">", n_big, const(0)),
                         builder.icmp_unsigned(">=", builder.mul(singles, const(2)), const(small)))
    n_big = builder.sub(n_big, builder.zext(trade, n.type))
    n_small = builder.udiv(builder.sub(n, builder.mul(n_big, const(big))), const(small))
    return n_big, n_small, builder.add(builder.mul(n_big, const(big)), builder.mul(n_small, const(small)))


@intrinsic
def nearest_tile(typingctx, X, r0, n, CT, cn, best, s1, s2):
    """See the module docstring: rows X[r0 : r0 + n], n <= TILE_ROWS, into best/s1/s2[0 : n]
    (1-D arrays with unit stride)."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype in (types.float32, types.float64)
            and isinstance(CT, types.Array) and CT.ndim == 3 and CT.dtype == X.dtype and CT.layout == "C"
            and isinstance(cn, types.Array) and cn.dtype == X.dtype and cn.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        _, _, _, CTv, cnv, bestv, s1v, s2v = args
        xty, _, _, cty, nty, bty, s1ty, s2ty = sig.args
        ety = context.get_data_type(xty.dtype)
        size = context.get_abi_sizeof(ety)
        W, T = PANEL_BYTES // size, TRANSPOSE_BYTES // size
        R = 8 * VECTOR_BYTES // PANEL_BYTES  # rows per block of products: 8 accumulators
        vty, tty = ir.VectorType(ety, W), ir.VectorType(ety, T)
        # Centre indices as integers of the scores' width: a select on them takes the compare's
        # mask as it is (32-bit indices beside float64 scores narrowed the mask, two more
        # shuffles a centre).
        kty, index_ty = (ir.IntType(64), types.int64) if size == 8 else (ir.IntType(32), types.int32)
        ity = ir.VectorType(kty, T)
        intp = context.get_value_type(types.intp)
        xa, r0v, nv, D = _rows_args(context, builder, sig, args)
        ca = context.make_array(cty)(context, builder, CTv)
        na = context.make_array(nty)(context, builder, cnv)
        n_blocks = cgutils.unpack_tuple(builder, ca.shape)[0]
        fma = _vector_function(builder, "fma", vty, 3)
        tmin, tmax = (_vector_function(builder, f, tty, 2) for f in ("minnum", "maxnum"))
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        zero = ir.Constant(vty, [ir.Constant(ety, 0.0)] * W)
        masks = _transpose_masks(T)
        # A block's scores, a W-lane vector per row, read back T rows by T centres and transposed.
        scores = cgutils.alloca_once(builder, vty, size=TILE_ROWS)
        # Per group of T rows (one per lane), over the blocks so far: the lowest score (min1), the
        # centre that has it (at) and the next lowest score (min2).
        min1 = cgutils.alloca_once(builder, tty, size=TILE_ROWS // T)
        min2 = cgutils.alloca_once(builder, tty, size=TILE_ROWS // T)
        at = cgutils.alloca_once(builder, ity, size=TILE_ROWS // T)
        accs = [cgutils.alloca_once(builder, vty) for _ in range(R)]
        n_row_groups = builder.udiv(builder.add(nv, const(T - 1)), const(T))
        infs = _splat(builder, tty, ir.Constant(ety, float("inf")))
        with cgutils.for_range(builder, n_row_groups) as groups:
            builder.store(infs, builder.gep(min1, [groups.index]))
            builder.store(infs, builder.gep(min2, [groups.index]))
            builder.store(ir.Constant(ity, [0] * T), builder.gep(at, [groups.index]))
        # Rows past n in the last group: defined scores (never stored out).
        with cgutils.for_range_slice(builder, nv, builder.mul(n_row_groups, const(T)), const(1)) as (row, _):
            builder.store(zero, builder.gep(scores, [row]))

        # The next tile's rows (X[r0 + n :], callers take tiles in order), a cache line of them
        # requested into L2 per feature of each run of R rows: prefetches spread among the FMAs
        # arrive in time, where the hardware's prefetcher left the search waiting on memory (float64
        # at 200k x 32, 51 MB: a pass 1.5x as long; prefetched into L1, 1.15x) and a burst of them
        # before the tile stalled it.
        x_stride = cgutils.unpack_tuple(builder, xa.strides)[0]
        x_end = builder.mul(cgutils.unpack_tuple(builder, xa.shape)[0], x_stride)  # bytes of X
        x_bytes = builder.bitcast(xa.data, ir.IntType(8).as_pointer())

        def products(row, R, cbase, norms):
            """Scores of rows row .. row + R - 1 (of the tile) against one block, into `scores`."""
            xrows = [_row_pointer(builder, xa, builder.add(r0v, builder.add(row, const(j)))) for j in range(R)]
            next_rows = builder.mul(builder.add(builder.add(r0v, nv), row), x_stride)
            for acc in accs[:R]:
                builder.store(norms, acc)
            with cgutils.for_range(builder, D) as features:
                d = features.index
                # R rows are at most D lines (R times the panel's 64 bytes of lanes, D features each)
                line = builder.add(next_rows, builder.mul(d, const(64)))
                line = builder.select(builder.icmp_unsigned("<", line, x_end), line, builder.sub(x_end, const(1)))
                _prefetch_line(builder, builder.gep(x_bytes, [line]), 2)
                c = builder.load(builder.bitcast(builder.gep(cbase, [builder.mul(d, const(W))]), vty.as_pointer()), align=1)
                for j in range(R):
                    xb = _splat(builder, vty, builder.load(builder.gep(xrows[j], [d])))
                    builder.store(builder.call(fma, [xb, c, builder.load(accs[j])]), accs[j])
            for j in range(R):
                builder.store(builder.load(accs[j]), builder.gep(scores, [builder.add(row, const(j))]))

        def fold(g, k0):
            """The block's W centres k0 .. k0 + W - 1 into row group g's minima, T centres at a time
            (a T x T transposition puts the rows in lanes), in order of k: ties keep the lowest k."""
            m1, m2, a = (builder.load(builder.gep(buf, [g])) for buf in (min1, min2, at))
            first = builder.gep(scores, [builder.mul(g, const(T))])
            for part in range(W // T):
                v = [builder.load(builder.gep(builder.bitcast(builder.gep(first, [const(j)]), tty.as_pointer()),
                                              [const(part)]), align=size) for j in range(T)]
                for t, s in enumerate(_transpose(builder, v, masks)):
                    k = builder.add(k0, const(part * T + t))
                    k = builder.trunc(k, kty) if kty.width < intp.width else k
                    lower = builder.fcmp_ordered("<", s, m1)  # strict: an earlier centre keeps a tie
                    m2 = builder.call(tmin, [m2, builder.call(tmax, [m1, s], fastmath=_NO_NAN)], fastmath=_NO_NAN)
                    m1 = builder.select(lower, s, m1)
                    a = builder.select(lower, _splat(builder, ity, k), a)
            for buf, value in ((min1, m1), (min2, m2), (at, a)):
                builder.store(value, builder.gep(buf, [g]))

        with cgutils.for_range(builder, n_blocks) as blocks:
            k0 = builder.mul(blocks.index, const(W))
            cbase = builder.gep(ca.data, [builder.mul(k0, D)])
            norms = builder.load(builder.bitcast(builder.gep(na.data, [k0]), vty.as_pointer()), align=1)
            # With several runs a group (T > R), a group's products, then its fold: the fold's
            # shuffles and selects overlap the next group's FMAs (1.1-1.2x as fast at K = 16, D = 32
            # float32 on AVX2). With one run a group, every run's products, then every fold: a
            # fold after every run was 1.03-1.07x as slow (float64 on AVX2).
            U = T if T > R else TILE_ROWS  # rows whose products come before their folds
            with cgutils.for_range(builder, builder.udiv(builder.add(nv, const(U - 1)), const(U))) as units:
                u0 = builder.mul(units.index, const(U))
                left = builder.sub(nv, u0)
                rows = builder.select(builder.icmp_unsigned("<", left, const(U)), left, const(U))
                n_runs = builder.udiv(rows, const(R))
                with cgutils.for_range(builder, n_runs) as runs:
                    products(builder.add(u0, builder.mul(runs.index, const(R))), R, cbase, norms)
                with cgutils.for_range_slice(builder, builder.add(u0, builder.mul(n_runs, const(R))),
                                             builder.add(u0, rows), const(1)) as (row, _):
                    products(row, 1, cbase, norms)
                g0 = builder.udiv(u0, const(T))
                with cgutils.for_range(builder, builder.udiv(builder.add(rows, const(T - 1)), const(T))) as groups:
                    fold(builder.add(g0, groups.index), k0)
        outs = [(context.make_array(t)(context, builder, v), context.get_data_type(t.dtype))
                for t, v in ((bty, bestv), (s1ty, s1v), (s2ty, s2v))]
        whole = builder.udiv(nv, const(T))
        with cgutils.for_range(builder, whole) as groups:  # whole groups: vector stores
            g = groups.index
            for (out, to), buf in zip(outs, (at, min1, min2)):
                dst = builder.bitcast(builder.gep(out.data, [builder.mul(g, const(T))]), ir.VectorType(to, T).as_pointer())
                builder.store(_vector_cast(builder, builder.load(builder.gep(buf, [g])), to), dst,
                              align=context.get_abi_sizeof(to))
        with cgutils.for_range_slice(builder, builder.mul(whole, const(T)), nv, const(1)) as (row, _):
            g, lane = builder.udiv(row, const(T)), builder.urem(row, const(T))
            for (out, to), buf, from_ty, t in zip(outs, (at, min1, min2), (index_ty, xty.dtype, xty.dtype),
                                                  (bty, s1ty, s2ty)):
                value = builder.extract_element(builder.load(builder.gep(buf, [g])), lane)
                builder.store(context.cast(builder, value, from_ty, t.dtype), builder.gep(out.data, [row]))
        return context.get_dummy_value()

    return types.void(X, r0, n, CT, cn, best, s1, s2), codegen


@intrinsic
def prefetch(typingctx, a, start, stop):
    """See the module docstring."""
    if not (isinstance(a, types.Array) and a.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(a)(context, builder, args[0])
        lo, hi = (context.cast(builder, args[j], sig.args[j], types.intp) for j in (1, 2))
        intp = context.get_value_type(types.intp)
        stride = cgutils.unpack_tuple(builder, arr.strides)[0]
        base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
        with cgutils.for_range_slice(builder, builder.mul(lo, stride), builder.mul(hi, stride),
                                     ir.Constant(intp, 64)) as (offset, _):
            _prefetch_line(builder, builder.gep(base, [offset]), 1)
        return context.get_dummy_value()

    return types.none(a, start, stop), codegen


@intrinsic
def claim(typingctx, counter):
    """counter[0] before an atomic increment (counter: an int64 array shared by the workers of a
    pass): each worker claims the next item until none is left, so a thread slowed by the host
    takes fewer items than the others. What each item computes, and where its result goes, does not
    depend on which thread claimed it."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


def _float_layout(ty):
    """(width, exponent bias, mantissa bits) of a Numba float type."""
    return (32, 127, 23) if ty == types.float32 else (64, 1023, 52)


@intrinsic
def pow2(typingctx, m):
    if m not in (types.float32, types.float64):
        return None
    bits, bias, mantissa = _float_layout(m)

    def codegen(context, builder, sig, args):
        ity, fty = ir.IntType(bits), context.get_value_type(m)
        if m == types.float64:
            # AVX2 has no packed double -> int64 conversion (fptosi became four scalar ones): m + 2^52
            # + bias holds m + bias in its low mantissa bits, which the shift moves into the exponent
            # field (m + bias < 2^11, so the sign bit stays 0)
            t = builder.fadd(args[0], ir.Constant(fty, 2.0**mantissa + bias))
            return builder.bitcast(builder.shl(builder.bitcast(t, ity), ir.Constant(ity, mantissa)), fty)
        e = builder.add(builder.fptosi(args[0], ity), ir.Constant(ity, bias))
        return builder.bitcast(builder.shl(e, ir.Constant(ity, mantissa)), fty)

    return m(m), codegen


@intrinsic
def polynomial(typingctx, x, coefficients):
    """See the module docstring."""
    if x not in (types.float32, types.float64) or not (isinstance(coefficients, types.UniTuple)
                                                       and coefficients.dtype == x and coefficients.count > 0):
        return None

    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(args[0].type, [args[0].type] * 3),
                                             "llvm.fma." + ("f32" if x == types.float32 else "f64"))
        terms = [builder.extract_value(args[1], j) for j in range(coefficients.count)]
        power = args[0]
        while len(terms) > 1:
            pairs = [builder.call(fma, [terms[j + 1], power, terms[j]]) for j in range(0, len(terms) - 1, 2)]
            terms = pairs + terms[len(terms) - len(terms) % 2 :]
            if len(terms) > 1:
                power = builder.fmul(power, power)
        return terms[0]

    return x(x, coefficients), codegen


@intrinsic
def split_exponent(typingctx, x):
    if x not in (types.float32, types.float64):
        return None
    bits, bias, mantissa = _float_layout(x)

    def codegen(context, builder, sig, args):
        ity, fty = ir.IntType(bits), context.get_value_type(x)
        b = builder.bitcast(args[0], ity)
        e = builder.sitofp(builder.sub(builder.lshr(b, ir.Constant(ity, mantissa)), ir.Constant(ity, bias)), fty)
        f = builder.or_(builder.and_(b, ir.Constant(ity, (1 << mantissa) - 1)), ir.Constant(ity, bias << mantissa))
        return context.make_tuple(builder, sig.return_type, [e, builder.bitcast(f, fty)])

    return types.UniTuple(x, 2)(x), codegen


@intrinsic
def max_nonnan(typingctx, a, b):
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(args[0].type, [args[0].type] * 2),
                                            "llvm.maxnum." + ("f32" if a == types.float32 else "f64"))
        return builder.call(fn, args, fastmath=_NO_NAN)

    return a(a, b), codegen


@intrinsic
def combine_rows(typingctx, C, A, base, out, upper):
    """See the module docstring."""
    dt = getattr(A, "dtype", None)
    if not (dt in (types.float32, types.float64)
            and all(isinstance(a, types.Array) and a.ndim == 2 and a.dtype == dt and a.layout == "C" for a in (C, A, out))
            and isinstance(base, types.Array) and base.ndim == 1 and base.dtype == types.float64
            and base.layout == "C" and isinstance(upper, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        ca, aa, ba, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:4], args[:4]))
        triangle = args[4]
        ety = context.get_data_type(dt)
        size = context.get_abi_sizeof(ety)
        V = VECTOR_BYTES // size
        vty = ir.VectorType(ety, V)
        intp = context.get_value_type(types.intp)
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        P, K = cgutils.unpack_tuple(builder, ca.shape)
        n = cgutils.unpack_tuple(builder, oa.shape)[1]
        fma = _vector_function(builder, "fma", vty, 3)
        accs = [[cgutils.alloca_once(builder, vty) for _ in range(2)] for _ in range(6)]

        # An empty base starts every output at zero: its loads read a zero of our own instead.
        zero64 = cgutils.alloca_once_value(builder, ir.Constant(ir.DoubleType(), 0.0))
        has_base = builder.icmp_signed(">", cgutils.unpack_tuple(builder, ba.shape)[0], const(0))

        def block(i0, k0, R):
            """out[k0 : k0 + R, i0 : i0 + 2V]."""
            for r in range(R):
                b = builder.load(builder.select(has_base, builder.gep(ba.data, [builder.add(k0, const(r))]), zero64))
                start = _splat(builder, vty, b if dt == types.float64 else builder.fptrunc(b, ety))
                for h in range(2):
                    builder.store(start, accs[r][h])
            reach = builder.add(k0, const(R))  # with `upper`, rows p < k0 + R of C reach these outputs
            stop = builder.select(builder.and_(triangle, builder.icmp_signed("<", reach, P)), reach, P)
            with cgutils.for_range(builder, stop) as ps:
                arow = builder.gep(_row_pointer(builder, aa, ps.index), [i0])
                x = [builder.load(builder.bitcast(builder.gep(arow, [const(h * V)]), vty.as_pointer()), align=size)
                     for h in range(2)]
                crow = builder.gep(_row_pointer(builder, ca, ps.index), [k0])
                for r in range(R):
                    w = _splat(builder, vty, builder.load(builder.gep(crow, [const(r)])))
                    for h in range(2):
                        builder.store(builder.call(fma, [w, x[h], builder.load(accs[r][h])]), accs[r][h])
            for r in range(R):
                orow = builder.gep(_row_pointer(builder, oa, builder.add(k0, const(r))), [i0])
                for h in range(2):
                    dst = builder.bitcast(builder.gep(orow, [const(h * V)]), vty.as_pointer())
                    builder.store(builder.load(accs[r][h]), dst, align=size)

        # Columns outer: a column block of A (P x 2V) stays in L1 while every row of out meets it.
        # With `upper`, four rows at a time only: a block's products reach p < k0 + R, so larger
        # blocks multiply more of the zeros below the diagonal (the full type's D = 32: 600 rows
        # of products against 576).
        sixes, quads, singles = _blocks(builder, K, 6, 4)
        sixes = builder.select(triangle, const(0), sixes)
        quads = builder.select(triangle, builder.udiv(K, const(4)), quads)
        singles = builder.select(triangle, builder.mul(quads, const(4)), singles)
        quads_from = builder.mul(sixes, const(6))
        with cgutils.for_range_slice(builder, const(0), n, const(2 * V)) as (i0, _):
            with cgutils.for_range(builder, sixes) as q:
                block(i0, builder.mul(q.index, const(6)), 6)
            with cgutils.for_range(builder, quads) as q:
                block(i0, builder.add(quads_from, builder.mul(q.index, const(4))), 4)
            with cgutils.for_range_slice(builder, singles, K, const(1)) as (k, _):
                block(i0, k, 1)
        return context.get_dummy_value()

    return types.none(C, A, base, out, upper), codegen


@intrinsic
def row_dots(typingctx, A, B, out, upper, P, lo, hi):
    """See the module docstring."""
    dt = getattr(A, "dtype", None)
    if not (dt in (types.float32, types.float64)
            and all(isinstance(a, types.Array) and a.ndim == 2 and a.dtype == dt and a.layout == "C" for a in (A, B))
            and isinstance(out, types.Array) and out.ndim == 2 and out.layout == "C"
            and out.dtype in (dt, types.float64) and isinstance(upper, types.Boolean)
            and isinstance(P, types.Array) and P.layout == "C"
            and all(isinstance(t, types.Integer) for t in (lo, hi))):
        return None

    def codegen(context, builder, sig, args):
        a_arr, b_arr, o_arr = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        triangle = args[3]
        ety, oty = context.get_data_type(dt), context.get_data_type(out.dtype)
        size = context.get_abi_sizeof(ety)
        V = VECTOR_BYTES // size
        vty, qty = ir.VectorType(ety, V), ir.VectorType(oty, 4)
        intp = context.get_value_type(types.intp)
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        n_a, n = cgutils.unpack_tuple(builder, a_arr.shape)
        n_b = cgutils.unpack_tuple(builder, b_arr.shape)[0]
        p_bytes = builder.bitcast(context.make_array(P)(context, builder, args[4]).data, ir.IntType(8).as_pointer())
        p_lo, p_hi = (context.cast(builder, args[j], sig.args[j], types.intp) for j in (5, 6))
        # The next prefetch's offset in P, from lo on: one cache line a step into L2 (into L1 the
        # products' own operands evicted them before use), the last one again once past hi, none
        # at all when lo >= hi.
        p_next = cgutils.alloca_once_value(builder, p_lo)
        p_any = builder.icmp_signed("<", p_lo, p_hi)
        p_last = builder.sub(p_hi, const(1))
        fma = _vector_function(builder, "fma", vty, 3)
        zero = ir.Constant(vty, [ir.Constant(ety, 0.0)] * V)
        T = TRANSPOSE_BYTES // size
        masks = [_transpose_masks(4), _transpose_masks(8) if T == 8 else None]  # one row of A's sums, two
        halves = [ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(h * 4, h * 4 + 4))) for h in range(2)]
        accs = [cgutils.alloca_once(builder, vty) for _ in range(12)]  # a * 4 + b
        osize = context.get_abi_sizeof(oty)

        def block(a0, R, rows_b, b0):
            """out[a0 : a0 + R, b0 : b0 + 4] += the products of A's rows a0.. and B's rows b0.."""
            rows_a = [_row_pointer(builder, a_arr, builder.add(a0, const(r))) for r in range(R)]
            for acc in accs[: 4 * R]:
                builder.store(zero, acc)
            with cgutils.for_range_slice(builder, const(0), n, const(V)) as (i, _):
                with builder.if_then(p_any, likely=True):
                    off = builder.load(p_next)
                    off = builder.select(builder.icmp_signed("<", off, p_hi), off, p_last)
                    _prefetch_line(builder, builder.gep(p_bytes, [off]), 2)
                    builder.store(builder.add(off, const(64)), p_next)
                load = lambda row: builder.load(builder.bitcast(builder.gep(row, [i]), vty.as_pointer()), align=size)  # noqa: E731
                u = [load(r) for r in rows_a]
                for c in range(4):  # B's rows one at a time: each is live for R FMAs only
                    v = load(rows_b[c])
                    for r in range(R):
                        acc = accs[r * 4 + c]
                        builder.store(builder.call(fma, [u[r], v, builder.load(acc)]), acc)
            # Sums of the accumulators, each first folded to T lanes (its halves added), T at a time
            # (two rows of A where T = 8, else one): after the transposition, lane j of the
            # vectors' sum is the sum of accumulator j's lanes, the dot product of row a0 + j // 4
            # and B's row b0 + j % 4.
            r = 0
            while r < R:
                rows = 2 if T == 8 and r + 1 < R else 1
                group = accs[r * 4 : (r + rows) * 4]
                t = _transpose(builder, [_fold_halves(builder, builder.load(acc), 4 * rows) for acc in group],
                               masks[rows - 1])
                total = t[0]
                for x in t[1:]:
                    total = builder.fadd(total, x)
                for h in range(rows):
                    quad = total if rows == 1 else builder.shuffle_vector(total, total, halves[h])
                    dst = builder.bitcast(builder.gep(_row_pointer(builder, o_arr, builder.add(a0, const(r + h))), [b0]),
                                          qty.as_pointer())
                    builder.store(builder.fadd(builder.load(dst, align=osize), _vector_cast(builder, quad, oty)), dst,
                                  align=osize)
                r += rows

        # B's four rows outer: they stay in L1 while every row of A meets them (A, a few rows, stays
        # there too); with A's rows outer, B (the diag type's 64 rows x 256, twice L1) came from L2.
        # A's rows three at a time (twelve accumulators: the FMAs in flight that two FMA units of
        # four cycles' latency take, with half again to spare), the last few two at a time; with
        # `upper`, all two at a time: a block on the diagonal then computes fewer entries below it
        # (the full type's D = 32: 9% more than the triangle's 528 instead of 15%).
        triples, pairs, _ = _blocks(builder, n_a, 3, 2)
        triples = builder.select(triangle, const(0), triples)
        pairs = builder.select(triangle, builder.udiv(n_a, const(2)), pairs)
        pairs_from = builder.mul(triples, const(3))
        with cgutils.for_range_slice(builder, const(0), n_b, const(4)) as (b0, _):
            rows_b = [_row_pointer(builder, b_arr, builder.add(b0, const(c))) for c in range(4)]
            reach = builder.add(b0, const(4))  # with `upper`, rows a < b0 + 4 of A reach b >= a
            stop = builder.select(builder.and_(triangle, builder.icmp_signed("<", reach, n_a)), reach, n_a)
            with cgutils.for_range(builder, triples) as t:
                a0 = builder.mul(t.index, const(3))
                with builder.if_then(builder.icmp_signed("<", a0, stop)):
                    block(a0, 3, rows_b, b0)
            with cgutils.for_range(builder, pairs) as q:
                a0 = builder.add(pairs_from, builder.mul(q.index, const(2)))
                with builder.if_then(builder.icmp_signed("<", a0, stop)):
                    block(a0, 2, rows_b, b0)
        return context.get_dummy_value()

    return types.none(A, B, out, upper, P, lo, hi), codegen


@intrinsic
def transpose_centred(typingctx, X, r0, n, m, out, squares):
    """See the module docstring."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype in (types.float32, types.float64)
            and X.layout == "C" and isinstance(m, types.Array) and m.ndim == 1 and m.dtype == X.dtype
            and all(isinstance(a, types.Array) and a.ndim == 2 and a.dtype == X.dtype for a in (out, squares))):
        return None

    def codegen(context, builder, sig, args):
        mv, outv, sqv = args[3:]
        ety = context.get_data_type(X.dtype)
        size = context.get_abi_sizeof(ety)
        T = TRANSPOSE_BYTES // size
        vty = ir.VectorType(ety, T)
        intp = context.get_value_type(types.intp)
        const = lambda v: ir.Constant(intp, v)  # noqa: E731
        xa, r0v, nv, D = _rows_args(context, builder, sig, args)
        ma = context.make_array(m)(context, builder, mv)
        oa = context.make_array(out)(context, builder, outv)
        sa = context.make_array(squares)(context, builder, sqv)
        with_squares = builder.icmp_signed(">", cgutils.unpack_tuple(builder, sa.shape)[0], const(0))
        whole = lambda v: builder.mul(builder.udiv(v, const(T)), const(T))  # noqa: E731
        masks = _transpose_masks(T)
        with cgutils.for_range_slice(builder, const(0), whole(nv), const(T)) as (i0, _):
            rows = [_row_pointer(builder, xa, builder.add(r0v, builder.add(i0, const(j)))) for j in range(T)]
            with cgutils.for_range_slice(builder, const(0), whole(D), const(T)) as (p0, _):
                v = _transpose(builder, [builder.load(builder.bitcast(builder.gep(r, [p0]), vty.as_pointer()), align=size)
                                         for r in rows], masks)
                for j in range(T):
                    p = builder.add(p0, const(j))
                    centre = _splat(builder, vty, builder.load(builder.gep(ma.data, [p])))
                    a = builder.fsub(v[j], centre)
                    dst = builder.gep(_row_pointer(builder, oa, p), [i0])
                    builder.store(a, builder.bitcast(dst, vty.as_pointer()), align=size)
                    with builder.if_then(with_squares):
                        dst = builder.gep(_row_pointer(builder, sa, p), [i0])
                        builder.store(builder.fmul(a, a), builder.bitcast(dst, vty.as_pointer()), align=size)
        return context.get_dummy_value()

    return types.none(X, r0, n, m, out, squares), codegen

