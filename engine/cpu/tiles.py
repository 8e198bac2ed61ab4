"""Register tiles for the Numba top-k kernels (engine/cpu/topk.py), as LLVM vector IR in Numba intrinsics.

Code generators rather than kernels, so they sit apart: no loop form got LLVM to emit these tiles, so each
intrinsic builds its FMA / shuffle sequence itself. Also the float32 <-> uint32 bit casts of the selection keys.

Numba's on-disk cache keys the kernels of topk.py on that file alone: after editing this one, touch topk.py (or
delete its __pycache__ entries), or the cached kernels keep the old tiles.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _f32_bits(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_F32 = ir.FloatType()
_V8 = ir.VectorType(_F32, 8)
_I32 = ir.IntType(32)


def _vload(builder, ptr, offset):
    p = builder.gep(ptr, [offset])
    return builder.load(builder.bitcast(p, _V8.as_pointer()), align=4)


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 8), lanes))


def _pair_sum(builder, a, b, lo, hi):
    return builder.fadd(_shuffle(builder, a, b, lo), _shuffle(builder, a, b, hi))


def _make_sum_tile(rows: int):
    """Intrinsic scoring `rows` consecutive item rows against 8 // rows queries (rows = 4: queries qa, qb;
    rows = 8: qa only), vectorised along d, for batches too small for the broadcast tiles.

    f(queries, qa, qb, items, row, ga, gb, out) -> uint32 mask: lane i = dot(items[row + i % rows],
    query (qa, qb)[i // rows]) goes to out[i], bit i set when it is >= that query's gate (ga, gb).
    8 accumulators + their operands fit the 16 AVX registers and every load feeds 1 .. 4 FMAs; the 8
    horizontal sums come out of one shuffle/add tree. The last d % 8 dims go through a zero-padded
    stack buffer, so any d works.
    """
    nq = 8 // rows

    @intrinsic
    def tile(typingctx, queries, qa, qb, items, row, ga, gb, out):
        f32c2 = types.Array(types.float32, 2, "C")
        if queries != f32c2 or items != f32c2 or out != types.Array(types.float32, 1, "C"):
            return None
        sig = types.uint32(queries, types.intp, types.intp, items, types.intp, types.float32, types.float32, out)

        def codegen(context, builder, signature, args):
            qarr = context.make_array(signature.args[0])(context, builder, args[0])
            xarr = context.make_array(signature.args[3])(context, builder, args[3])
            oarr = context.make_array(signature.args[7])(context, builder, args[7])
            d = cgutils.unpack_tuple(builder, qarr.shape, 2)[1]
            qp = [builder.gep(qarr.data, [builder.mul(q, d)]) for q in (args[1], args[2])[:nq]]
            row = args[4]
            xp = [builder.gep(xarr.data, [builder.mul(builder.add(row, ir.Constant(row.type, i)), d)])
                  for i in range(rows)]
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fmuladd.v8f32")
            zero = ir.Constant(_V8, [0.0] * 8)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(8)]  # promoted to registers

            def step(vq, vx):
                for i, a in enumerate(acc):
                    builder.store(builder.call(fmuladd, [vq[i // rows], vx[i % rows], builder.load(a)]), a)

            nfull = builder.lshr(d, ir.Constant(d.type, 3))
            with cgutils.for_range(builder, nfull) as loop:
                j = builder.shl(loop.index, ir.Constant(d.type, 3))
                step([_vload(builder, ptr, j) for ptr in qp], [_vload(builder, ptr, j) for ptr in xp])
            rem = builder.and_(d, ir.Constant(d.type, 7))
            with builder.if_then(builder.icmp_unsigned("!=", rem, ir.Constant(d.type, 0)), likely=False):
                j0 = builder.shl(nfull, ir.Constant(d.type, 3))
                tails = []
                for ptr in qp + xp:
                    buf = cgutils.alloca_once(builder, _V8)
                    builder.store(zero, buf)
                    fbuf = builder.bitcast(buf, _F32.as_pointer())
                    with cgutils.for_range(builder, rem) as t:
                        builder.store(builder.load(builder.gep(ptr, [builder.add(j0, t.index)])),
                                      builder.gep(fbuf, [t.index]))
                    tails.append(builder.load(buf))
                step(tails[:nq], tails[nq:])
            a = [builder.load(x) for x in acc]
            # Transpose-and-add tree: lane i of the result is the sum of all lanes of a[i].
            ev, od = [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15]
            p = [_pair_sum(builder, a[2 * i], a[2 * i + 1], ev, od) for i in range(4)]
            lo2, hi2 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            q = [_pair_sum(builder, p[0], p[1], lo2, hi2), _pair_sum(builder, p[2], p[3], lo2, hi2)]
            sums = _pair_sum(builder, q[0], q[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
            builder.store(sums, builder.bitcast(oarr.data, _V8.as_pointer()), align=4)
            g = builder.insert_element(ir.Constant(_V8, ir.Undefined), args[5], ir.Constant(_I32, 0))
            g = builder.insert_element(g, args[6], ir.Constant(_I32, 1))
            g = _shuffle(builder, g, g, [i // rows for i in range(8)])
            hit = builder.fcmp_ordered(">=", sums, g)  # NaN never passes
            return builder.zext(builder.bitcast(hit, ir.IntType(8)), _I32)

        return sig, codegen

    return tile


_sum4x2 = _make_sum_tile(4)
_sum8x1 = _make_sum_tile(8)


def _make_bcast_tile(vecs: int):
    """Intrinsic scoring 4 item rows against 8 * vecs queries held transposed (qt [d, Bpad]).

    The GEMM-style tile for bigger batches: each step broadcasts one coordinate of each row and does an
    FMA with 8 queries' coordinates, so accumulators hold finished dots (no horizontal sums) and each
    call does 4 * 8 * vecs * d FMAs for a few instructions of overhead.
    f(qt, col, items, row, gates, out) -> uint64 mask, bit ri * 8 * vecs + c set when
    out[ri * 8 * vecs + c] = dot(items[row + ri], query col + c) >= gates[col + c].
    """
    width = 8 * vecs

    @intrinsic
    def tile(typingctx, qt, col, items, row, gates, out):
        f32c2, f32c1 = types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C")
        if qt != f32c2 or items != f32c2 or gates != f32c1 or out != f32c1:
            return None
        sig = types.uint64(qt, types.intp, items, types.intp, gates, out)

        def codegen(context, builder, signature, args):
            qarr = context.make_array(signature.args[0])(context, builder, args[0])
            xarr = context.make_array(signature.args[2])(context, builder, args[2])
            garr = context.make_array(signature.args[4])(context, builder, args[4])
            oarr = context.make_array(signature.args[5])(context, builder, args[5])
            d, bpad = cgutils.unpack_tuple(builder, qarr.shape, 2)
            col, row = args[1], args[3]
            qbase = builder.gep(qarr.data, [col])
            xp = [builder.gep(xarr.data, [builder.mul(builder.add(row, ir.Constant(row.type, i)), d)])
                  for i in range(4)]
            fmuladd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fmuladd.v8f32")
            zero = ir.Constant(_V8, [0.0] * 8)
            acc = [cgutils.alloca_once_value(builder, zero) for _ in range(4 * vecs)]
            splat = ir.Constant(ir.VectorType(_I32, 8), [0] * 8)
            with cgutils.for_range(builder, d) as loop:
                qrow = builder.gep(qbase, [builder.mul(loop.index, bpad)])
                qv = [_vload(builder, qrow, ir.Constant(d.type, 8 * v)) for v in range(vecs)]
                for ri in range(4):
                    x = builder.load(builder.gep(xp[ri], [loop.index]))
                    xv = builder.insert_element(ir.Constant(_V8, ir.Undefined), x, ir.Constant(_I32, 0))
                    xv = builder.shuffle_vector(xv, xv, splat)
                    for v in range(vecs):
                        a = acc[ri * vecs + v]
                        builder.store(builder.call(fmuladd, [xv, qv[v], builder.load(a)]), a)
            mask = ir.Constant(ir.IntType(64), 0)
            gbase = builder.gep(garr.data, [col])
            for v in range(vecs):
                g = _vload(builder, gbase, ir.Constant(d.type, 8 * v))
                for ri in range(4):
                    a = builder.load(acc[ri * vecs + v])
                    slot = ri * width + 8 * v
                    builder.store(a, builder.bitcast(builder.gep(oarr.data, [ir.Constant(d.type, slot)]),
                                                     _V8.as_pointer()), align=4)
                    hit = builder.zext(builder.bitcast(builder.fcmp_ordered(">=", a, g), ir.IntType(8)),
                                       ir.IntType(64))
                    mask = builder.or_(mask, builder.shl(hit, ir.Constant(ir.IntType(64), slot)))
            return mask

        return sig, codegen

    return tile


_bcast4x16 = _make_bcast_tile(2)
_bcast4x8 = _make_bcast_tile(1)


@intrinsic
def _cttz64(typingctx, x):
    """Index of the lowest set bit of a nonzero uint64 (llvm.cttz): walks a hit mask in one step per hit."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen
