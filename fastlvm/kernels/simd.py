"""Register-blocked SIMD loops that Numba's own code generation does not produce, written as
Numba intrinsics (LLVM IR built at compile time, so they inline into the kernels that call them
and are cached with them).

`nearest_rows(X, r, CT, cn, best, s1, s2, o, R)`: for the R rows X[r : r + R] (R a literal 1 or 4)
and the centres given transposed, CT (D, KP) with KP a multiple of the lane count W, and their
squared norms cn (KP,) (padding +inf), the nearest centre by score s_k = cn_k - 2 x . c_k:
best[j] = argmin (ties to the lowest k), s1[j] its score and s2[j] the next lowest (inf when
K = 1), into entries o + j, j < R, of the outputs, scores computed in X's dtype.

The products x . c_k for W consecutive centres are W lanes of one vector: per feature d, one
vector load of CT[d, k0 : k0 + W], one broadcast of x_d per row and one FMA per row; the R
accumulators stay in registers (R = 4 with W = 64 bytes of lanes: 8 AVX2 registers or 4 AVX-512
ones). BLAS on these shapes (a tile of rows by K = 16 centres, D = 32) spends longer packing the
tile than multiplying it; here X is read as stored. The argmin of a block of W centres is a
vector minimum, a lane compare and a count of trailing zeros, with no per-centre branch.
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


@intrinsic
def nearest_rows(typingctx, X, r, CT, cn, best, s1, s2, o, R):
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype in (types.float32, types.float64)
            and isinstance(CT, types.Array) and CT.dtype == X.dtype and CT.layout == "C"
            and isinstance(cn, types.Array) and cn.dtype == X.dtype and isinstance(R, types.IntegerLiteral)):
        return None
    n_rows = R.literal_value

    def codegen(context, builder, sig, args):
        Xv, rv, CTv, cnv, bestv, s1v, s2v, ov, _ = args
        xty, _, cty, nty, bty, s1ty, s2ty, _, _ = sig.args
        ety = context.get_data_type(xty.dtype)
        W = VECTOR_BYTES // context.get_abi_sizeof(ety)
        vty = ir.VectorType(ety, W)
        intp = rv.type
        xa = context.make_array(xty)(context, builder, Xv)
        ca = context.make_array(cty)(context, builder, CTv)
        na = context.make_array(nty)(context, builder, cnv)
        D = cgutils.unpack_tuple(builder, xa.shape)[1]
        KP = cgutils.unpack_tuple(builder, ca.shape)[1]
        fma = _vector_function(builder, "fma", vty, 3)
        vmin = _vector_function(builder, "vector.reduce.fmin", vty, 1, ety)
        zero = ir.Constant(vty, [ir.Constant(ety, 0.0)] * W)
        xrows = [_row_pointer(builder, xa, builder.add(rv, ir.Constant(intp, j))) for j in range(n_rows)]
        i32 = ir.IntType(32)
        ity = ir.VectorType(i32, W)
        infs = _splat(builder, vty, ir.Constant(ety, float("inf")))
        accs = [cgutils.alloca_once(builder, vty) for _ in range(n_rows)]
        # Per lane l, over the blocks so far: the lowest score (min1), the block it came from (at)
        # and the next lowest score (min2) of the centres k = block * W + l.
        min1 = [cgutils.alloca_once_value(builder, infs) for _ in range(n_rows)]
        min2 = [cgutils.alloca_once_value(builder, infs) for _ in range(n_rows)]
        at = [cgutils.alloca_once_value(builder, ir.Constant(ity, [0] * W)) for _ in range(n_rows)]
        minus_two = _splat(builder, vty, ir.Constant(ety, -2.0))
        with cgutils.for_range(builder, builder.udiv(KP, ir.Constant(intp, W))) as blocks:
            k0 = builder.mul(blocks.index, ir.Constant(intp, W))
            for acc in accs:
                builder.store(zero, acc)
            cbase = builder.gep(ca.data, [k0])
            with cgutils.for_range(builder, D) as features:
                d = features.index
                c = builder.load(builder.bitcast(builder.gep(cbase, [builder.mul(d, KP)]), vty.as_pointer()), align=1)
                for j in range(n_rows):
                    xb = _splat(builder, vty, builder.load(builder.gep(xrows[j], [d])))
                    builder.store(builder.call(fma, [xb, c, builder.load(accs[j])]), accs[j])
            norms = builder.load(builder.bitcast(builder.gep(na.data, [k0]), vty.as_pointer()), align=1)
            block = _splat(builder, ity, builder.trunc(blocks.index, i32))
            for j in range(n_rows):
                scores = builder.call(fma, [minus_two, builder.load(accs[j]), norms])
                m1, m2 = builder.load(min1[j]), builder.load(min2[j])
                lower = builder.fcmp_ordered("<", scores, m1)  # strict: an earlier block keeps a tie
                builder.store(builder.select(lower, m1, builder.select(builder.fcmp_ordered("<", scores, m2), scores, m2)),
                              min2[j])
                builder.store(builder.select(lower, scores, m1), min1[j])
                builder.store(builder.select(lower, block, builder.load(at[j])), at[j])
        # Across lanes: the lowest score, the lowest centre index that has it, and the next lowest
        # score (the other lanes' minima and every lane's second).
        iota = ir.Constant(ity, list(range(W)))
        umin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [ity]),
                                              f"llvm.vector.reduce.umin.v{W}i32")
        for j in range(n_rows):
            m1 = builder.load(min1[j])
            s1 = builder.call(vmin, [m1], fastmath=_NO_NAN)
            ks = builder.add(builder.mul(builder.load(at[j]), _splat(builder, ity, ir.Constant(i32, W))), iota)
            ties = builder.fcmp_ordered("==", m1, _splat(builder, vty, s1))
            k = builder.call(umin, [builder.select(ties, ks, _splat(builder, ity, ir.Constant(i32, 2**31 - 1)))])
            lane = builder.and_(k, ir.Constant(i32, W - 1))
            others = builder.select(builder.icmp_unsigned("==", iota, _splat(builder, ity, lane)), infs, m1)
            s2 = builder.call(vmin, [builder.select(builder.fcmp_ordered("<", others, builder.load(min2[j])), others,
                                                    builder.load(min2[j]))], fastmath=_NO_NAN)
            index = builder.add(ov, ir.Constant(intp, j))
            for arr_ty, arr_v, value, from_ty in ((bty, bestv, k, types.int32), (s1ty, s1v, s1, xty.dtype),
                                                  (s2ty, s2v, s2, xty.dtype)):
                out = context.make_array(arr_ty)(context, builder, arr_v)
                builder.store(context.cast(builder, value, from_ty, arr_ty.dtype), builder.gep(out.data, [index]))
        return context.get_dummy_value()

    return types.void(X, r, CT, cn, best, s1, s2, o, R), codegen
