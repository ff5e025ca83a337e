"""Paged decode attention: one new query token per request over its paged KV."""

from __future__ import annotations

import torch

from kernels._triton import (
    LazyKernel,
    check,
    check_device,
    check_float_dtype,
    check_index_tensor,
    check_last_dim_contiguous,
    config,
    gdc_launch_dependents,
    gdc_wait,
    interpreter_enabled,
    next_pow2,
    num_sms,
    tl,
)


def softcap_scores(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Attention-logit soft-capping (Gemma 2): ``softcap * tanh(scores / softcap)`` in place; 0 is off."""
    return scores.div_(softcap).tanh_().mul_(softcap) if softcap else scores


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``[0, length)`` of one request's paged cache as ``(length, kv_heads, head_dim)``."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    rows = cache.index_select(0, pages[:n_pages]).flatten(0, 1)
    return rows[:length]


DecodePlan = list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]
BLOCK_DIAGONAL_MAX_KV_HEADS = 4  # see decode_attention_ref


def decode_plan(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> DecodePlan:
    """Groups of requests by context length (power-of-two page buckets), for :func:`decode_attention_ref`.

    Each group: (request rows, their flattened page ids, padded width in slots, valid-slot mask).
    It depends only on the page table and the lengths, so a forward pass computes it once for all
    layers (``TorchAttentionBackend`` does).
    """
    lens = seq_lens.tolist()
    buckets: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        if n > 0:
            pages = (n + page_size - 1) // page_size
            buckets.setdefault(1 << (pages - 1).bit_length(), []).append(b)
    plan: DecodePlan = []
    for rows in buckets.values():
        n_pages = (max(lens[b] for b in rows) + page_size - 1) // page_size
        idx = torch.tensor(rows, device=page_table.device)
        table = page_table.index_select(0, idx)[:, :n_pages].reshape(-1).long()
        width = n_pages * page_size
        valid = torch.arange(width, device=seq_lens.device) < seq_lens.index_select(0, idx.to(seq_lens.device))[:, None]
        plan.append((idx, table, width, valid))
    return plan


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    plan: DecodePlan | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of one query token per request over its whole context.

    Shapes: ``q`` ``(batch, q_heads, head_dim)``; caches ``(num_pages, page_size, kv_heads, head_dim)``;
    ``page_table`` ``(batch, max_pages)`` int32/int64; ``seq_lens`` ``(batch,)`` context lengths
    INCLUDING the current token (whose K/V are already stored). A slot with ``seq_len == 0`` is empty
    and yields zeros. Returns ``(batch, q_heads, head_dim)`` in ``q.dtype``. ``plan``: a precomputed
    :func:`decode_plan` of the same page table and lengths. ``softcap`` > 0 caps the scaled scores
    (:func:`softcap_scores`) before the mask and softmax.
    """
    # NOTE: requests are grouped by context length (power-of-two page buckets) and each group is one
    # batched matmul-softmax-matmul over its gathered pages: a per-request loop costs ~10 Python ops per
    # request per layer, padding a whole batch to its longest context wastes up to B x the work, and
    # torch's CPU SDPA is ~4x slower than two plain matmuls for a single query token.
    batch, q_heads, dim = q.shape
    out = torch.zeros_like(q)
    if batch == 0:
        return out
    num_pages, page_size, kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    # NOTE: with few KV heads the queries go in block-diagonal form, (h, j) -> q[h, j] in column block h,
    # so both matmuls take the gathered pages as they lie, (rows, width, kv_heads * dim): no per-head
    # permute copy of K and V (those copies were half the time of a 1.5K-token decode). It multiplies
    # zeros kv_heads x over, cheap while kv_heads is small; many KV heads take the per-head path.
    block_diagonal = kv_heads <= BLOCK_DIAGONAL_MAX_KV_HEADS
    eye = torch.eye(kv_heads, dtype=k_cache.dtype, device=q.device) if block_diagonal else None
    k_rows, v_rows = k_cache.view(num_pages, -1), v_cache.view(num_pages, -1)
    for idx, table, width, valid in plan if plan is not None else decode_plan(page_table, seq_lens, page_size):
        n = int(idx.shape[0])
        k = k_rows.index_select(0, table).view(n, width, kv_heads, dim)
        v = v_rows.index_select(0, table).view(n, width, kv_heads, dim)
        qg = (q.index_select(0, idx) * scale).view(n, kv_heads, group, dim).to(k.dtype)
        if eye is not None:
            qbd = (qg[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(n, q_heads, kv_heads * dim)
            scores = softcap_scores(torch.bmm(qbd, k.view(n, width, -1).transpose(1, 2)).float(), softcap)
            scores.masked_fill_(~valid[:, None, :].to(q.device), float("-inf"))
            o = torch.bmm(scores.softmax(-1).to(v.dtype), v.view(n, width, -1)).view(n, kv_heads, group, kv_heads, dim)
            o = torch.diagonal(o, dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(n, q_heads, dim)
        else:
            scores = softcap_scores(torch.matmul(qg, k.permute(0, 2, 3, 1)).float(), softcap)  # (rows, kv, group, w)
            scores.masked_fill_(~valid[:, None, None, :].to(q.device), float("-inf"))
            o = torch.matmul(scores.softmax(-1).to(v.dtype), v.permute(0, 2, 1, 3)).reshape(n, q_heads, dim)
        out.index_copy_(0, idx, o.to(q.dtype))
    return out


# ---------------------------------------------------------------------------------------------------
# Triton: flash-decoding. Kernel 1 splits each request's context into as many chunks as its grid's third
# dimension and computes a normalized partial output + log-sum-exp per (request, q head, split); kernel 2
# merges the splits. Unsplit (one chunk) kernel 1 writes the final output directly and kernel 2 is skipped.
# NOTE: the split count is a launch value, not a constexpr: every count runs the same two compiled kernels
# (split or not), so an eager step that meets a new count compiles nothing while serving.

MAX_SPLITS = 64  # the most chunks a context is cut into
MERGE_SPLITS = 16  # splits the merge kernel reads at a time (a 16 x head_dim fp32 tile, whatever the count)

_LOG2E = 1.4426950408889634


def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    o_ptr,
    lse_ptr,
    sm_scale_log2,
    softcap,
    stride_q_b,
    stride_q_h,
    stride_k_page,
    stride_k_slot,
    stride_k_head,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_pt_b,
    stride_pt_n,
    stride_o_b,
    stride_o_h,
    stride_o_s,
    stride_lse_b,
    stride_lse_h,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Program ``(b, kv_head, split)``: the GQA group of ``kv_head`` over one chunk of request ``b``.

    With ``SOFTCAP`` the scores are capped (``softcap * tanh(s / softcap)``) and ``sm_scale_log2`` is the
    plain scale: the log2(e) factor comes after the cap.
    """
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_q_b + head[:, None] * stride_q_h + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's bf16 math and bf16 tl.dot are wrong: compute in fp32
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * stride_pt_b
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(pt_row + (offs_n // PAGE_SIZE) * stride_pt_n, mask=n_mask, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + page[:, None] * stride_k_page + slot[:, None] * stride_k_slot
            + kv_head * stride_k_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        if SOFTCAP:  # tanh through exp (no tl.tanh everywhere): sign(x) (1 - e^-2|x|) / (1 + e^-2|x|)
            x = qk / softcap
            t = tl.exp(-2.0 * tl.abs(x))
            th = (1.0 - t) / (1.0 + t)
            qk = tl.where(x < 0.0, -th, th) * (softcap * 1.4426950408889634)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + page[:, None] * stride_v_page + slot[:, None] * stride_v_slot
            + kv_head * stride_v_head + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_mask = h_mask[:, None] & d_mask[None, :]
    o_offs = b * stride_o_b + head[:, None] * stride_o_h + split * stride_o_s + offs_d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    if SPLIT:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lse_b + head * stride_lse_h + split, lse, mask=h_mask)


def _decode_reduce_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    stride_p_b,
    stride_p_h,
    stride_p_s,
    stride_lse_b,
    stride_lse_h,
    stride_out_b,
    stride_out_h,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Program ``(b, q_head)``: merge the splits' partial outputs weighted by their log-sum-exp, ``BLOCK_S``
    splits at a time with a running maximum (the count is a launch value: one compile for every count)."""
    if USE_GDC:  # PDL (kernels/_triton.py): the kernel before has finished writing; the next may launch
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_row = lse_ptr + b * stride_lse_b + h * stride_lse_h
    part_row = partial_ptr + b * stride_p_b + h * stride_p_h
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)  # a 0-d fp32, as tl.max gives in the loop
    den = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        s_mask = s < num_splits
        lse = tl.load(lse_row + s, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty: weights 0, not NaN
        alpha = tl.exp2(m - base)
        w = tl.exp2(lse - base)
        part = tl.load(part_row + s[:, None] * stride_p_s + offs_d[None, :],
                       mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc = acc * alpha + tl.sum(part * w[:, None], 0)
        den = den * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


_decode_partial = LazyKernel(
    _decode_partial_kernel,
    configs=[  # the first is the fixed GPU config when autotuning is off
        config(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in ((64, 4, 2), (32, 4, 2), (128, 8, 2), (64, 8, 3))
    ],
    key=["GROUP", "HEAD_DIM", "PAGE_SIZE", "SPLIT", "BLOCK_H"],
    interpret={"BLOCK_N": 32},
    pdl=True,
    # NOTE: Triton compiles an int apart when it is 1 or a multiple of 16. An eager step's table is row-major,
    # a graph's column-major (appliance.engine.graph_plan), and the partials' strides follow the split count
    # (4 splits: a head's lse 4 apart, 16 splits: 16): none picks a compile
    do_not_specialize=("stride_pt_b", "stride_pt_n", "stride_o_b", "stride_o_h", "stride_o_s", "stride_lse_b",
                       "stride_lse_h"),
)
_decode_reduce = LazyKernel(_decode_reduce_kernel, pdl=True, do_not_specialize=(
    "stride_p_b", "stride_p_h", "stride_p_s", "stride_lse_b", "stride_lse_h", "num_splits"))


def default_num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per request so ``batch * kv_heads * splits`` fills the GPU about 4 times over, with each
    split covering at least 256 tokens of the longest possible context (``max_context``), rounded down to
    a power of two, at most :data:`MAX_SPLITS`; 1 on CPU."""
    if device.type != "cuda":
        return 1
    return num_splits_for(batch, kv_heads, max_context, num_sms(device))


def num_splits_for(batch: int, kv_heads: int, max_context: int, sms: int) -> int:
    """:func:`default_num_splits` on a GPU of ``sms`` multiprocessors (pure: CUDA graphs plan with it)."""
    want = -(-4 * sms // max(batch * kv_heads, 1))
    return 1 << (max(1, min(want, -(-max_context // 256), MAX_SPLITS)).bit_length() - 1)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Triton :func:`decode_attention_ref` (paged, GQA, split-K over the context; ``softcap`` as there).

    ``num_splits`` (default: :func:`default_num_splits`, decided from shapes only, so no host sync)
    is how many chunks each request's context is cut into; the chunks are merged by a second kernel.
    ``q`` may be a strided view with a unit-stride last dim; ``page_table`` may have any strides (CUDA
    graphs keep it column-major, so a step copies only the columns its contexts reach).
    """
    op = "decode_attention"
    device = check_device(op, q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens)
    check_attention_inputs(op, q, k_cache, v_cache, page_table, seq_lens, "seq_lens")
    check(q.shape[0] == seq_lens.shape[0], f"{op}: q has {q.shape[0]} requests but seq_lens has {seq_lens.shape[0]}")
    batch, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_cache.shape
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, page_table.shape[1] * page_size, device)
    check(isinstance(num_splits, int) and 1 <= num_splits <= MAX_SPLITS,
          f"{op}: num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits}")
    check(softcap >= 0.0, f"{op}: softcap must be >= 0 (0: off), got {softcap}")
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if batch == 0:
        return out
    group = q_heads // kv_heads
    interp = interpreter_enabled()
    # NOTE: tl.dot needs every dim >= 16 on a GPU (the interpreter does not care): pad and mask.
    block_h = next_pow2(group) if interp else max(16, next_pow2(group))
    block_d = next_pow2(head_dim) if interp else max(16, next_pow2(head_dim))
    if num_splits == 1:
        partial, lse = out, out  # lse unused
        p_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        partial = torch.empty((batch, q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        lse = torch.empty((batch, q_heads, num_splits), dtype=torch.float32, device=device)
        p_strides = partial.stride()[:3]
        lse_strides = lse.stride()[:2]
    _decode_partial[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, partial, lse,
        scale if softcap else scale * _LOG2E, float(softcap),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), page_table.stride(1),
        *p_strides, *lse_strides,
        GROUP=group, PAGE_SIZE=page_size, HEAD_DIM=head_dim, SPLIT=num_splits > 1,
        UPCAST=interp, DOT_PRECISION=dot_precision(q.dtype), SOFTCAP=bool(softcap),
        BLOCK_H=block_h, BLOCK_D=block_d,
    )
    if num_splits > 1:
        _decode_reduce[(batch, q_heads)](
            partial, lse, out,
            *partial.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, BLOCK_S=MERGE_SPLITS, BLOCK_D=block_d,
        )
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (not TF32), default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attention_inputs(
    op: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    lens: torch.Tensor,
    lens_name: str,
) -> None:
    """Shared shape/dtype/stride checks of the paged attention wrappers (``q`` is 3-D either way)."""
    check(q.dim() == 3, f"{op}: q must be 3-D (tokens, q_heads, head_dim), got {tuple(q.shape)}")
    check(k_cache.dim() == 4, f"{op}: k_cache must be (num_pages, page_size, kv_heads, head_dim), "
          f"got {tuple(k_cache.shape)}")
    check(v_cache.shape == k_cache.shape,
          f"{op}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    check_float_dtype(op, "q", q)
    check_float_dtype(op, "k_cache", k_cache)
    check(v_cache.dtype == k_cache.dtype, f"{op}: v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(op, name, t)
    q_heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    check(k_cache.shape[3] == head_dim, f"{op}: q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    check(kv_heads > 0 and q_heads % kv_heads == 0,
          f"{op}: q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    check_index_tensor(op, "page_table", page_table, 2)
    check_index_tensor(op, lens_name, lens, 1)
    check(lens.is_contiguous(), f"{op}: {lens_name} must be contiguous")
    check(lens.shape[0] == page_table.shape[0],
          f"{op}: {lens_name} has {lens.shape[0]} entries but page_table has {page_table.shape[0]} rows")
