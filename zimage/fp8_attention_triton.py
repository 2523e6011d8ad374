"""The Triton kernels of fp8_attention.py (imported on first use: CPU installs have no Triton). Module-level, so
a kernel's call of `attend_block` resolves the same way in Triton's compiler and in its interpreter."""

import triton
import triton.language as tl


@triton.jit
def quantize_kernel(x_ptr, stride_b, stride_s, stride_h, sub_ptr, q_ptr, scale_ptr, seq, heads, tiles, top, tiny,
                    D: tl.constexpr, TILE: tl.constexpr, TRANSPOSE: tl.constexpr, INT8: tl.constexpr,
                    SUBTRACT: tl.constexpr):
    """One (token tile, head) block of x to 8 bits with one scale (its largest magnitude -> `top`)."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = tile * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, D)
    mask = (rows < seq)[:, None]
    src = x_ptr + b.to(tl.int64) * stride_b + rows.to(tl.int64)[:, None] * stride_s + h * stride_h + cols[None, :]
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if SUBTRACT:  # padded tokens stay 0: they must not count in the tile's largest magnitude
        x = tl.where(mask, x - tl.load(sub_ptr + bh * D + cols)[None, :], 0.0)
    s = tl.div_rn(tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), tiny), top)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -top), top)  # IEEE division: the reference's codes exactly
    if INT8:  # round half away from zero; the cast truncates
        q = q + tl.where(q >= 0, 0.5, -0.5)
    q = q.to(q_ptr.dtype.element_ty)
    base = q_ptr + bh.to(tl.int64) * seq * D
    if TRANSPOSE:  # (D, S) per head: tokens contiguous
        tl.store(base + cols[:, None] * seq + rows[None, :], tl.trans(q), mask=(rows < seq)[None, :])
    else:
        tl.store(base + rows[:, None] * D + cols[None, :], q, mask=mask)
    tl.store(scale_ptr + bh * tiles + tile, s)


@triton.jit
def attend_block(q, q_scale, k_ptr, vt_ptr, sk_ptr, sv_ptr, base, start_n, seq, tile0, sv_max, fp8_max, m_i, l_i,
                 acc, offs_d, D: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One key/value block of the online softmax: (m_i, l_i, acc) updated. MASKED: the last, partial block."""
    n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptr + base + n[:, None] * D + offs_d[None, :], mask=(n < seq)[:, None], other=0.0)
        vt = tl.load(vt_ptr + base + offs_d[:, None] * seq + n[None, :], mask=(n < seq)[None, :], other=0.0)
    else:
        k = tl.load(k_ptr + base + n[:, None] * D + offs_d[None, :])
        vt = tl.load(vt_ptr + base + offs_d[:, None] * seq + n[None, :])
    tile = tile0 + start_n // TILE
    qk = tl.dot(q, tl.trans(k)).to(tl.float32) * (q_scale * tl.load(sk_ptr + tile))  # int32 for int8
    if MASKED:
        qk = tl.where((n < seq)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    c = fp8_max * tl.load(sv_ptr + tile) / sv_max  # P's factor for this key tile (<= 448)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - (m_new - tl.log2(c))[:, None])  # P x c
    l_i = l_i * alpha + tl.sum(p, axis=1) / c
    # Added in float32, not accumulated in place: Hopper's e4m3 tensor-core accumulator keeps ~14 mantissa
    # bits, and over ~70 blocks that shrank the output by 0.3 % at 4352 tokens (0.6 % at 9472).
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), tl.trans(vt))
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["tiles"])
def attention_kernel(q_ptr, k_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, sv_max_ptr, o_ptr, so_b, so_s, so_h, seq,
                     heads, tiles, qk_scale, fp8_max, D: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """BLOCK_M queries of one (batch, head) against every key: the output rows, bf16."""
    tl.static_assert(TILE % BLOCK_M == 0 and TILE % BLOCK_N == 0)  # one scale per block
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    base = bh.to(tl.int64) * seq * D  # the same for (S, D) and (D, S) per head
    q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m < seq)[:, None], other=0.0)
    # log2-domain logits: softmax scale x log2(e) x the q tile's scale (x the k tile's, per block)
    q_scale = qk_scale * tl.load(sq_ptr + bh * tiles + start_m // TILE)
    sv_max = tl.load(sv_max_ptr + bh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = seq - seq % BLOCK_N  # whole blocks unmasked, then the partial one (one compiled kernel for any length)
    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, acc = attend_block(q, q_scale, k_ptr, vt_ptr, sk_ptr, sv_ptr, base, start_n, seq, bh * tiles,
                                     sv_max, fp8_max, m_i, l_i, acc, offs_d, D, TILE, BLOCK_N, False)
    if full < seq:
        m_i, l_i, acc = attend_block(q, q_scale, k_ptr, vt_ptr, sk_ptr, sv_ptr, base, full, seq, bh * tiles,
                                     sv_max, fp8_max, m_i, l_i, acc, offs_d, D, TILE, BLOCK_N, True)
    out = acc * (sv_max / fp8_max) / l_i[:, None]
    b, h = bh // heads, bh % heads
    dst = o_ptr + b.to(tl.int64) * so_b + offs_m.to(tl.int64)[:, None] * so_s + h * so_h + offs_d[None, :]
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(offs_m < seq)[:, None])
