"""The ``cpu`` backend: the forward pass's kernels built for speed on CPUs.

The references in ``kernels`` are written to be obviously right; they stay the tests' oracle (the
``torch`` backend). This backend computes the same functions with fewer, larger ops:

- linear layers through oneDNN with weights packed once at load (``pack_linear``): MKL's GEMM takes a
  slow path for few-row inputs on some CPUs (4-8x slower than oneDNN at 4-16 rows on a Zen 1 here);
  one or two rows go in padded to four, since oneDNN's own 1- and 2-row kernels are slower still;
- rotary cos/sin gathered once per forward pass, not once per layer;
- prefill attention through pdbox's own C kernels (``kernels.cpu.flash_extend``: bf16 on AVX-512 BF16,
  ~3x torch's SDPA on a Zen 4; fp32 on AVX2, 1.4-1.6x SDPA on a Zen 3; both read the pages in place), one
  call per request covering the cached prefix and the causal part of the new tokens; where the kernel
  cannot be built, through torch's fused SDPA with a lower-right causal bias;
- decode attention through the same libraries (``kernels.cpu.flash_decode``: a KV head's query heads
  share each key read, pages read in place; bf16 2-5x the torch path on a Zen 4, fp32 on AVX2 2-5x on a
  Zen 3); without the kernel, at batch 1 it reads the request's leading run of consecutive pages in place
  and gathers only the rest (``decode_runs``): fused SDPA with a KV head's query heads as the query
  length; larger batches gather and go batched by length, as the reference does;
- no dtype round trips when the engine runs fp32;
- a GGUF's 4- and 8-bit weights (Q4_0, Q4_1, Q8_0) also kept as their blocks (``q4_blocks``,
  ``q8_blocks``) for decode's few rows, reading a quarter of fp32's bytes or less: through pdbox's own
  AVX2 kernel (``kernels.cpu.quant_gemv``: rows rounded to int16 per block of 32; up to
  ``QUANT_MAX_ROWS`` rows), or where it cannot be built the 4-bit ones through torch's int4 kernel (rows
  rounded to bf16; up to ``INT4_MAX_ROWS``); more rows (prefill) run oneDNN on the float weights.

In an fp32 model, or a bf16 one on AVX-512 BF16, whose layers are plain (``PlainLayer``) and whose linear
weights are all quantized, a decode step of up to ``LAYER_MAX_ROWS`` rows runs each layer as one call
(``decode_layers``: the same kernels and conversions called from C; ``kernels.cpu.decode_layer``): the same
bits as op by op up to ``QUANT_MAX_ROWS`` rows; past it (bf16's 5 and 6 rows) the one call keeps the
quantized GEMV where the op-by-op step runs oneDNN, so the bits are the GEMV's.

SDPA cannot soft-cap attention scores, so with ``softcap`` set (Gemma 2) both attention calls take the
references' explicit matmul-tanh-softmax path instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from appliance.engine.attention import PlainLayer, norm_then_linear, rotary_then_store
from appliance.engine.decode_runs import RunSplit, attend_decode, decode_way, supports
from appliance.model.q4_blocks import GROUP, Q4Blocks
from appliance.model.q8_blocks import Q8Blocks
from kernels.cpu.decode_layer import MAX_ROWS as LAYER_ROWS_LIMIT
from kernels.cpu.decode_layer import DecodeLayer, DecodeStep, decode_layer
from kernels.cpu.decode_layer import native as native_decode_layer
from kernels.cpu.flash_decode import MAX_GROUP, DecodeTable, decode_table, flash_decode
from kernels.cpu.flash_decode import native_f32 as native_decode_f32
from kernels.cpu.flash_extend import MAX_HEAD_DIM, flash_extend
from kernels.cpu.flash_extend import native as native_attention_lib
from kernels.cpu.flash_extend import native_f32 as native_extend_f32
from kernels.cpu.pointwise import add_rmsnorm, rotary, silu_and_mul, store_kv
from kernels.cpu.pointwise import native as native_pointwise_lib
from kernels.cpu.quant_gemv import Q4Weight, Q8Weight, quant_linear
from kernels.cpu.quant_gemv import native as native_quant_lib
from kernels.decode_attention import DecodePlan
from kernels.extend_attention import extend_attention_ref, gather_pages
from kernels.kv_store import store_kv_ref

# NOTE: oneDNN picks slower kernels for a 1- or 2-row input than for 4 rows (2-core Zen 4, the linear
# layers of one SmolLM2 step, `python -m bench.linear_rows`, ms for 1 / 2 / 3 / 4 rows: bf16 1 thread
# 15.2 / 17.1 / 13.8 / 13.4, fp32 1 thread 29.1 / 34.5 / - / 23.7; bf16 2 threads 9.5 / 10.0 / 9.5 /
# 9.0), so 1 or 2 rows go in padded to 4 (3 rows gain nothing from it). A padded row is what the same
# row gives in a batch of 4: bit-equal for the 576-wide inputs here, while the 1536-wide down
# projection splits its sum otherwise in 3 of 20 random rows (bf16). Of six SmolLM2 bf16 chat answers
# at batch 1, one picks another list bullet at token 25 (a near tie); the fp32 equality tests hold.
PAD_MAX_ROWS = 2
PADDED_ROWS = 4
# NOTE: torch's int4 kernel pays for every added row while oneDNN's bf16 GEMM takes rows almost free; over
# one SmolLM2 step's layers (2-core Zen 4, `python -m bench.linear_rows --threads 1`, ms for 1 / 2 / 4 / 5 /
# 8 rows) int4 6.4 / 8.2 / 11.0 / 16.9 / 21.4 against oneDNN bf16 15.1 / 17.3 / 13.5 / 15.7 / 17.9. On a
# 2-core Zen 3 (AVX2, no bf16 instructions) against oneDNN fp32, 1 / 2 / 4 / 8 rows: int4 17.0 / 18.4 /
# 23.3 / 47.0, fp32 29.5 / 31.2 / 39.6 / 50.4 (unpadded).
INT4_MAX_ROWS = 4
# NOTE: pdbox's AVX2 kernel over the same layers on the Zen 3, 1 thread, 1 / 2 / 4 / 8 rows: 7.3 / 10.5 / 16.8 /
# 30.7 ms (2 threads 5.2 / 6.5 / 10.1 / 17.8), so an fp32 engine takes it up to 8 rows (oneDNN fp32 there: 50);
# since it takes 16 rows in groups of 8 over cached columns, 2 threads, 9 / 12 / 16 rows: 19.3 / 23.7 / 34.3 ms
# against oneDNN fp32's 29.6 / 33.5 / 39.8, so up to 16. bf16 keeps int4's bound, where oneDNN bf16 takes added
# rows almost free
QUANT_MAX_ROWS = {torch.float32: 16, torch.bfloat16: INT4_MAX_ROWS}
# NOTE: a decode step of up to this many rows runs a call a layer (`decode_layers`), on the quantized GEMV. In
# bf16 that passes the op-by-op bound above: at 5 and 6 rows the Python the one call saves outweighs oneDNN's
# cheaper added rows, not past that (2-core Zen 4, SmolLM2, `python -m bench.engine --decode-batches 4,5,6,8
# --layer-max-rows 4` against the default, docs/bench/engine/bf16-layer-a0e8948/). There the one call's
# GEMV sums what the op-by-op step would give oneDNN, so the bits are the GEMV's, not oneDNN's.
LAYER_MAX_ROWS = {torch.float32: QUANT_MAX_ROWS[torch.float32], torch.bfloat16: 6}
# NOTE: oneDNN builds (JIT, ~1 ms) and caches a primitive per input shape, and each keeps its own memory:
# ~0.65 MiB a row count for SmolLM2's weights, 3 MiB for the 3072-wide gate/up at 200-300 rows
# (`_linear_pointwise`, 1 thread, Zen 3). A prefill engine sees nearly every row count up to its chunk, so
# its resident memory grew ~190 MiB a round of a 150-request soak (`python -m bench.soak`) toward the
# caches' 1024 primitives, and evicting and rebuilding them grows it further. Rows past ``EXACT_ROWS`` go
# in padded (zeros) up to `onednn_rows`: ~80 shapes per weight up to the CPU chunk (320 rows), ~200 up to
# 1024, at most 7 padded rows or a 32nd of them. Prefill-only, 15 batches of 1-3 random prompts of 20-1200
# tokens (19,355 tokens), 1 thread, alternating: 292 / 292 tok/s padded against 276 / 287 with every
# count's own primitive (the builds cost more than the padding).
EXACT_ROWS = 64


def onednn_rows(rows: int) -> int:
    """The rows a oneDNN linear call runs ``rows`` input rows at: exact up to ``EXACT_ROWS``, then rounded
    up to a multiple of a 64th of the next power of two (at least 8): 72, 80, ... 512, 528, ... 1024, 1056 ..."""
    if rows <= EXACT_ROWS:
        return rows
    step = max(8, (1 << (rows - 1).bit_length()) // 64)
    return -(-rows // step) * step


@dataclass(frozen=True)
class DecodeRows:
    """A mixed step's decoding requests: batch rows, query rows, their page table, lengths and way."""

    rows: list[int]
    q_rows: torch.Tensor
    table: torch.Tensor
    lens: torch.Tensor
    way: RunSplit | DecodePlan | DecodeTable


def onednn_available() -> bool:
    """Whether this torch can run linear layers on prepacked oneDNN weights."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_available() -> bool:
    """Whether oneDNN can pack and run bf16 weights on this CPU (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT;
    without them bf16 weights stay unpacked, on torch's own kernels)."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def int4_available() -> bool:
    """Whether this torch has the CPU int4 weight-only kernel."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class PackedWeight:
    """A ``(out, in)`` weight in oneDNN's blocked layout, with its logical shape and dtype (fp32 or bf16),
    and where ``blocks`` gives its quantized GGUF blocks, one of: ``quant``, those blocks in pdbox's AVX2
    kernel's layout (``native_quant``); ``int4``, 4-bit ones packed for torch's int4 kernel with their bf16
    ``(in / 32, out, 2)`` scales and zeros (see `int4_linear`)."""

    __slots__ = ("packed", "shape", "dtype", "int4", "quant")

    def __init__(self, weight: torch.Tensor, blocks: Q4Blocks | Q8Blocks | None = None,
                 native_quant: bool = False) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self.quant: Q4Weight | Q8Weight | None = None
        if blocks is None or blocks.shape != self.shape:
            return
        if native_quant:
            self.quant = pack_blocks(blocks)
        elif isinstance(blocks, Q4Blocks) and int4_available():
            try:
                codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.codes.to(torch.int32), 1)
            except RuntimeError:  # a shape the kernel does not take: the floats for every row count
                return
            scales = torch.stack([blocks.scale.t(), blocks.zero.t()], -1).to(torch.bfloat16).contiguous()
            self.int4 = (codes, scales)


def pack_blocks(blocks: Q4Blocks | Q8Blocks) -> Q4Weight | Q8Weight:
    """A GGUF weight's 4- or 8-bit blocks in the layout of pdbox's quantized GEMV (``kernels.cpu.quant_gemv``)."""
    if isinstance(blocks, Q4Blocks):
        return Q4Weight.pack(blocks.codes, blocks.scale, blocks.zero)
    return Q8Weight.pack(blocks.codes, blocks.scale)


def int4_linear(x: torch.Tensor, int4: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x @ w.T`` for a `PackedWeight`'s ``int4`` blocks, in ``x``'s dtype; the kernel takes bf16 rows (a
    ``(rows, in)`` fp32 input is rounded to bf16 and the output widened back)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), int4[0], GROUP, int4[1])
    return out.to(x.dtype)


class CpuAttentionBackend:
    """Fast CPU kernels; same functions as the references (``appliance.engine.attention``)."""

    name = "cpu"

    def __init__(self, pack_weights: bool = True, native_kernels: bool = True) -> None:
        self.pack_weights = pack_weights and onednn_available()
        # pdbox's C kernels (bf16 only), or why not: "off" when not asked for
        attention = native_attention_lib() if native_kernels else None
        pointwise = native_pointwise_lib() if native_kernels else None
        self.native_attention = attention is not None and attention.lib is not None
        self.native_pointwise = pointwise is not None and pointwise.lib is not None
        self.native_reason = "off" if attention is None or pointwise is None else (
            attention.reason if attention.lib is None else pointwise.reason)
        # pdbox's fp32 pointwise and decode attention kernels (AVX2)
        pointwise_f32 = native_pointwise_lib(torch.float32) if native_kernels else None
        self.native_pointwise_f32 = pointwise_f32 is not None and pointwise_f32.lib is not None
        self.native_decode_f32 = native_kernels and native_decode_f32().lib is not None
        self.native_extend_f32 = native_kernels and native_extend_f32().lib is not None
        # pdbox's AVX2 kernel for a GGUF's quantized weights (any dtype), or why not
        quant = native_quant_lib() if native_kernels else None
        self.native_quant = quant is not None and quant.lib is not None
        self.native_quant_reason = "off" if quant is None else quant.reason
        # the one-call decode layers (those kernels, called from C), by the layers' dtype
        self.native_decode_layer = native_kernels and native_decode_layer().lib is not None
        self.native_decode_layer_bf16 = native_kernels and native_decode_layer(torch.bfloat16).lib is not None
        self.layer_max_rows = dict(LAYER_MAX_ROWS)  # by dtype (a bench may move it: `bench.engine --layer-max-rows`)
        # NOTE: per-forward caches keyed by the batch's own tensors (identity), like the reference
        # backend's decode plan: every layer of one pass sees the same positions / page table.
        self._rope_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._way_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._way: RunSplit | DecodePlan | DecodeTable = []
        self._lens_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lens: list[tuple[int, int]] = []
        self._table = torch.empty(0, dtype=torch.int64)
        self._decode_rows: DecodeRows | None = None
        self._pads: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    # -- linear layers ------------------------------------------------------------------------
    def pack_linear(self, weight: torch.Tensor,
                    blocks: Q4Blocks | Q8Blocks | None = None) -> torch.Tensor | PackedWeight:
        """The form :meth:`linear` takes: packed for oneDNN when it can run this dtype here, with
        ``blocks`` packed beside it for few-row steps."""
        if self.pack_weights and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
            try:
                return PackedWeight(weight, blocks, self.native_quant)
            except RuntimeError:  # a oneDNN build without this layout: every layer goes unpacked
                self.pack_weights = False
        return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor | PackedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, PackedWeight):
            if x.dtype != weight.dtype:
                x = x.to(weight.dtype)
            rows = x.shape[0]
            if weight.quant is not None and x.dim() == 2 and rows <= QUANT_MAX_ROWS[x.dtype]:
                out = quant_linear(x.float().contiguous(), weight.quant, torch.get_num_threads(), checked=False)
                out = out if x.dtype == torch.float32 else out.to(x.dtype)
                return out if bias is None else out.add_(bias)
            if weight.int4 is not None and x.dim() == 2 and rows <= INT4_MAX_ROWS:
                out = int4_linear(x, weight.int4)
                return out if bias is None else out.add_(bias)
            if x.dim() == 2 and rows <= PAD_MAX_ROWS:  # one or two decode rows: padded (see PADDED_ROWS)
                padded = self._pad_rows(x.shape[1], x.dtype)
                padded[:rows].copy_(x)
                return torch.ops.mkldnn._linear_pointwise(padded, weight.packed, bias, "none", [], "")[:rows]
            run_rows = onednn_rows(rows) if x.dim() == 2 else rows
            if run_rows == rows:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.packed, bias, "none", [], "")
            x = F.pad(x, (0, 0, 0, run_rows - rows))
            return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")[:rows]
        return F.linear(x.to(weight.dtype), weight, bias)

    def _pad_rows(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``(PADDED_ROWS, width)`` input buffer, kept per width and dtype. Rows past the ones a call
        writes keep stale values: each output row depends on its own input row only."""
        buf = self._pads.get((width, dtype))
        if buf is None:
            # NOTE: a normal tensor even when made inside inference mode: an inference tensor may not
            # be written outside it, and the head's linear runs there (``Model.logits``)
            with torch.inference_mode(False):
                buf = self._pads[(width, dtype)] = torch.zeros(PADDED_ROWS, width, dtype=dtype)
        return buf

    # -- attention ----------------------------------------------------------------------------
    def store_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        if (self._native_rows(k.dtype) and k.dtype == v.dtype == k_cache.dtype
                and slot_mapping.dtype == torch.int64 and k.stride(-1) == v.stride(-1) == 1
                and k.stride(1) == v.stride(1) == k.shape[2]):
            store_kv(k_cache, v_cache, k, v, slot_mapping)
        else:
            store_kv_ref(k_cache, v_cache, k, v, slot_mapping)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
        """One query token per request over its paged context (see ``decode_attention_ref``)."""
        key = self._way_key
        if key is None or key[0] is not page_table or key[1] is not seq_lens:
            self._way = self._decode_way(q, k_cache, page_table, seq_lens, softcap)
            self._way_key = (page_table, seq_lens)
        return self._attend_decode(q, k_cache, v_cache, page_table, seq_lens, self._way, scale, softcap)

    def _native_decode(self, q: torch.Tensor, k_cache: torch.Tensor, softcap: float) -> bool:
        if softcap or q.dtype != k_cache.dtype or q.shape[1] // k_cache.shape[2] > MAX_GROUP:
            return False
        if q.dtype == torch.float32:
            return self.native_decode_f32 and q.shape[-1] % 8 == 0 and q.shape[-1] <= MAX_HEAD_DIM
        return self.native_attention and q.dtype == torch.bfloat16 and q.shape[-1] % 64 == 0

    def _decode_way(self, q: torch.Tensor, k_cache: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                    softcap: float = 0.0) -> RunSplit | DecodePlan | DecodeTable:
        """How a decode batch attends, for every layer of one pass: the native kernel's checked table, or
        the torch way ``decode_way`` picks."""
        if self._native_decode(q, k_cache, softcap) and int(seq_lens.min()) >= 1:  # an empty slot: torch's zeros
            return decode_table(page_table, seq_lens, k_cache.shape[0], k_cache.shape[1])
        in_place = q.dtype if not softcap and supports(q, k_cache) else None
        return decode_way(page_table, seq_lens, k_cache.shape[1], in_place)

    @staticmethod
    def _attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                       seq_lens: torch.Tensor, way: RunSplit | DecodePlan | DecodeTable, scale: float,
                       softcap: float = 0.0) -> torch.Tensor:
        if isinstance(way, DecodeTable):
            return flash_decode(q, k_cache, v_cache, way, scale, torch.get_num_threads())
        return attend_decode(q, k_cache, v_cache, page_table, seq_lens, way, scale, softcap)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               prefix_lens: torch.Tensor, extend_lens: torch.Tensor, scale: float,
               softcap: float = 0.0, *, extend_start: torch.Tensor | None = None,
               max_extend: int | None = None) -> torch.Tensor:
        """Causal attention of each request's new tokens over its cache rows ``[0, prefix + i]``."""
        if softcap:
            return extend_attention_ref(q, k_cache, v_cache, page_table, prefix_lens, extend_lens, scale, softcap)
        key = self._lens_key
        if key is None or key[0] is not prefix_lens or key[1] is not extend_lens:
            self._lens = list(zip(prefix_lens.tolist(), extend_lens.tolist()))
            self._lens_key = (prefix_lens, extend_lens)
            self._table = page_table.to(torch.int64).contiguous()
            self._decode_rows = self._plan_decode_rows(q, k_cache, page_table)
        out = torch.empty_like(q)
        skip: set[int] = set()
        if self._decode_rows is not None:
            # NOTE: a mixed step's decoding requests (one new token over a cached context) attend
            # together, as in a decode-only step, instead of one gathered call each
            d = self._decode_rows
            out.index_copy_(0, d.q_rows, self._attend_decode(q.index_select(0, d.q_rows), k_cache, v_cache,
                                                             d.table, d.lens, d.way, scale))
            skip = set(d.rows)
        group = q.shape[1] // k_cache.shape[2]
        native = self._native_extend(q, k_cache)
        threads = torch.get_num_threads()
        start = 0
        for b, (prefix, n_new) in enumerate(self._lens):
            if n_new == 0 or b in skip:
                start += n_new
                continue
            if native:
                flash_extend(q[start : start + n_new], k_cache, v_cache, self._table[b], prefix, scale, threads,
                             out=out[start : start + n_new])
                start += n_new
                continue
            total = prefix + n_new
            k = gather_pages(k_cache, page_table[b], total).transpose(0, 1)
            v = gather_pages(v_cache, page_table[b], total).transpose(0, 1)
            if group > 1:  # SDPA's fused CPU kernel wants equal head counts
                k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            qb = q[start : start + n_new].transpose(0, 1)
            # imported here: torch.nn.attention.bias imports torch._dynamo (~1.7 s of every worker's start-up),
            # and the native kernel takes most extends
            from torch.nn.attention.bias import causal_lower_right

            o = F.scaled_dot_product_attention(
                qb[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=causal_lower_right(n_new, total),
                scale=scale,
            )
            out[start : start + n_new] = o[0].transpose(0, 1)
            start += n_new
        return out

    def _native_extend(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        page_size = k_cache.shape[1]
        if q.dtype != k_cache.dtype or q.shape[-1] > MAX_HEAD_DIM or page_size & (page_size - 1):
            return False
        if q.dtype == torch.float32:
            return self.native_extend_f32 and q.shape[-1] % 8 == 0
        return self.native_attention and q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0

    def _plan_decode_rows(self, q: torch.Tensor, k_cache: torch.Tensor, page_table: torch.Tensor) -> DecodeRows | None:
        """The requests of an extend batch that decode (one new token after a cached prefix), or
        ``None`` for fewer than two."""
        rows, q_rows, lens, start = [], [], [], 0
        for b, (prefix, n_new) in enumerate(self._lens):
            if n_new == 1 and prefix > 0:
                rows.append(b)
                q_rows.append(start)
                lens.append(prefix + 1)
            start += n_new
        if len(rows) < 2:
            return None
        table = page_table.index_select(0, torch.tensor(rows, device=page_table.device))
        seq_lens = torch.tensor(lens)
        return DecodeRows(rows, torch.tensor(q_rows), table, seq_lens, self._decode_way(q, k_cache, table, seq_lens))

    # -- whole decode layers ------------------------------------------------------------------
    def decode_layers(self, layers: list[PlainLayer]) -> list[DecodeLayer] | None:
        """The layers as one-call decode layers, or ``None`` where they cannot be: the kernels are not here for
        the model's dtype (fp32: AVX2; bf16: AVX-512 BF16), a weight is not quantized, or the kernels refuse a
        shape."""
        if not layers:
            return None
        first = layers[0].qkv
        dtype = first.dtype if isinstance(first, PackedWeight) else None
        if not (dtype == torch.float32 and self.native_decode_layer
                or dtype == torch.bfloat16 and self.native_decode_layer_bf16):
            return None
        built = []
        for lay in layers:
            ws = (lay.qkv, lay.o_proj, lay.gate_up, lay.down)
            if not all(isinstance(w, PackedWeight) and w.quant is not None and w.dtype == dtype for w in ws):
                return None
            if lay.k_cache.dtype != dtype:
                return None
            try:
                built.append(DecodeLayer.build(lay.input_norm, lay.post_norm, *(w.quant for w in ws), lay.cos_sin,
                                               lay.k_cache, lay.v_cache, lay.num_q_heads, lay.eps, lay.scale))
            except ValueError:
                return None
        return built

    def decode_step(self, layers: list[DecodeLayer], x: torch.Tensor, positions: torch.Tensor,
                    slot_mapping: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor) -> DecodeStep | None:
        """A decode step's rows for :meth:`decode_layer`, or ``None`` where it runs op by op: more rows than
        ``layer_max_rows`` in the layers' dtype, embeddings that are not fp32, or a request with no cached row
        (attention's zeros)."""
        rows, first = x.shape[0], layers[0]
        bound = min(self.layer_max_rows[first.dtype], LAYER_ROWS_LIMIT)
        if x.dtype != torch.float32 or not 1 <= rows <= bound or int(seq_lens.min()) < 1:
            return None
        plan = decode_table(page_table, seq_lens, first.num_pages, first.page_size)
        return DecodeStep.build(first, positions, slot_mapping, plan)

    def decode_layer(self, layer: DecodeLayer, step: DecodeStep, x: torch.Tensor | None,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of a decode step in one call: ``(its output, the residual)``; ``x`` ``None`` for the first."""
        return decode_layer(layer, step, x, residual, torch.get_num_threads())

    # -- pointwise ----------------------------------------------------------------------------
    def _native_rows(self, dtype: torch.dtype) -> bool:
        """Whether pdbox's pointwise C kernels take rows of ``dtype`` here."""
        return self.native_pointwise if dtype == torch.bfloat16 else (dtype == torch.float32
                                                                      and self.native_pointwise_f32)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            if self.native_pointwise_f32 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 16 == 0:
                return add_rmsnorm(None, x, weight, eps, torch.get_num_threads(), torch.float32,
                                   checked=_check_norm(weight, x))[0]
            return F.rms_norm(x, weight.shape, weight, eps)  # one aten op, bit-equal to the below
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, -1, keepdim=True).add_(eps))
        return out.mul_(weight).to(x.dtype)

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """With the C kernels, one pass; in a bf16 model (``x`` bf16, the residual fp32) the normed rows come
        back bf16: the next linear layer reads them so."""
        if (self._native_rows(x.dtype) and residual.dtype == weight.dtype == torch.float32
                and x.dim() == 2 and x.shape == residual.shape and x.shape[1] % 16 == 0
                and out_dtype in (None, x.dtype) and x.stride(1) == 1 and residual.stride(1) == 1):
            return add_rmsnorm(x, residual, weight, eps, torch.get_num_threads(), x.dtype,
                               checked=_check_norm(weight, x))
        residual = x + residual
        out = self.rmsnorm(residual, weight, eps)
        return (out if out_dtype is None else out.to(out_dtype)), residual

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._rope_key
        first = key is None or key[0] is not positions or key[1] is not cos_sin_cache  # a new forward pass
        if first:
            self._rope_key = (positions, cos_sin_cache)
            self._rope = None  # cos/sin gathered on first use, by the torch path only
        qk = _joined(q, k)
        if (qk is not None and self._native_rows(q.dtype) and q.shape[-1] % 32 == 0
                and cos_sin_cache.dtype == torch.float32 and positions.dtype == torch.int64):
            # the positions are checked against the cache, and the rest, once per pass
            out = rotary(qk, positions, cos_sin_cache, torch.get_num_threads(), check_positions=first, checked=first)
            hq = q.shape[1]
            return out[:, :hq], out[:, hq:]  # two slices: Tensor.split alone took ~5 us of Python here
        if self._rope is None:
            cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).float().chunk(2, dim=-1)
            self._rope = (torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))
        cos, sin = self._rope
        if qk is not None:  # q then k in one buffer (the fused QKV output): rotate them as one tensor
            return _rotate(qk, cos, sin).split([q.shape[1], k.shape[1]], dim=1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    rotary_store_kv = rotary_then_store  # the C kernels' rotary and store, one after the other
    norm_linear = norm_then_linear

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self._native_rows(x.dtype) and x.dim() == 2 and x.shape[1] % 32 == 0 and x.stride(1) == 1:
            return silu_and_mul(x, torch.get_num_threads(), checked=False)  # all it checks, checked here
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def silu_mul_linear(self, x: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
        """In an fp32 model's few-row steps, one call: the quantized GEMV makes ``silu(gate) * up`` as it
        reads its input, with the C SiLU's own formula (the same bits as the two calls)."""
        if (isinstance(weight, PackedWeight) and weight.quant is not None and x.dtype == torch.float32
                and self.native_pointwise_f32 and x.dim() == 2 and x.shape[0] <= QUANT_MAX_ROWS[torch.float32]
                and x.stride(1) == 1):
            return quant_linear(x, weight.quant, torch.get_num_threads(), silu_mul=True, checked=False)
        return self.linear(self.silu_and_mul(x), weight)


def _check_norm(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `add_rmsnorm` must check its arguments: the callers above checked the rows' dtypes, shapes
    and strides, so only a weight that is not what the model keeps (a contiguous fp32 row) needs it."""
    return not (weight.dtype == torch.float32 and weight.is_contiguous() and weight.shape == (x.shape[-1],))


def _joined(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``q`` and ``k`` ``(T, heads, D)`` as one ``(T, q heads + k heads, D)`` view when ``k``'s heads
    directly follow ``q``'s in memory (the fused QKV output), else ``None``."""
    t, hq, d = q.shape
    # NOTE: at T = 1 the views of a split row carry unrelated row strides (576 vs 192): only the
    # head and element strides must agree there
    if (q.dtype != k.dtype or k.shape[0] != t or k.shape[2] != d or q.stride(2) != 1 or k.stride(2) != 1
            or q.stride(1) != k.stride(1) or (t > 1 and q.stride(0) != k.stride(0))
            or k.data_ptr() != q.data_ptr() + hq * q.stride(1) * q.element_size()):
        return None
    return q.as_strided((t, hq + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary of ``x`` ``(T, heads, D)`` into a new tensor, fp32 math; ``cos`` is
    ``[cos, cos]`` and ``sin`` is ``[-sin, sin]`` over the head dim (``(T, 1, D)``, fp32), so
    ``x * cos + roll(x, D/2) * sin`` is the rotation (the same products and sums as rotating each
    half, so the same bits)."""
    out = x * cos  # fp32: a bf16 x is widened exactly
    out.addcmul_(x.roll(x.shape[-1] // 2, -1), sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)
