"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2/3) over a paged KV cache,
tensor-parallel aware.

Plain tensors, not ``nn.Module``s: each layer keeps its fused weights (QKV, gate/up) in the engine
dtype, and the forward pass is a short list of kernel calls through the attention backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from appliance.config import ModelConfig, RankInfo
from appliance.engine.attention import AttentionBackend, PlainLayer
from appliance.engine.forward_batch import ForwardBatch
from appliance.model.moe import MoEWeights, moe_forward
from appliance.model.q4_blocks import Q4Blocks
from appliance.model.q8_blocks import Q8Blocks
from kernels.rotary import rotary_cos_sin_cache

AllReduce = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Shard:
    """The head and FFN ranges one TP rank owns."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]

    @classmethod
    def of(cls, cfg: ModelConfig, rank: RankInfo) -> Shard:
        t, r = rank.world_size, rank.rank
        kv = rank.kv_head_range(cfg.num_kv_heads)
        if t <= cfg.num_kv_heads:
            q = (kv[0] * cfg.group_size, kv[1] * cfg.group_size)
        else:
            if t % cfg.num_kv_heads or cfg.num_heads % t:
                raise ValueError(
                    f"tensor parallel size {t} does not fit {cfg.num_kv_heads} KV heads / "
                    f"{cfg.num_heads} query heads (needs tp <= kv heads, or a multiple dividing both)"
                )
            q = (r * cfg.num_heads // t, (r + 1) * cfg.num_heads // t)
        ffn = (r * cfg.intermediate_size // t, (r + 1) * cfg.intermediate_size // t)
        return cls(q, kv, ffn)

    @staticmethod
    def moe_slice(cfg: ModelConfig, rank: RankInfo) -> tuple[int, int]:
        """The slice of every expert's intermediate dim this rank owns."""
        t, r, n = rank.world_size, rank.rank, cfg.moe_intermediate_size
        return r * n // t, (r + 1) * n // t

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass
class LayerWeights:
    """One layer's weights; the linear ones in the form the backend's ``linear`` takes."""

    input_norm: torch.Tensor
    qkv: Any
    qkv_bias: torch.Tensor | None
    o_proj: Any
    post_norm: torch.Tensor
    gate_up: Any
    down: Any
    moe: MoEWeights | None = None  # a mixture-of-experts layer: gate_up and down are None
    q_norm: torch.Tensor | None = None  # per-head RMSNorm weights (Qwen3), (head_dim,)
    k_norm: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None  # added once, on rank 0 (o_proj is split by rows across ranks)
    post_attn_norm: torch.Tensor | None = None  # sandwich norms (Gemma): post_norm is then the pre-FFN one
    post_ffn_norm: torch.Tensor | None = None
    local_rope: bool = False  # rotates with the local theta (Gemma's sliding layers)


class LlamaModel:
    """The decoder; ``forward`` returns the final hidden states of ``batch.logit_rows``."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        rank: RankInfo | None = None,
        all_reduce: AllReduce | None = None,
        quant: dict[str, Q4Blocks | Q8Blocks] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.dtype = dtype
        self.device = device
        self.rank = rank or RankInfo()
        self.shard = Shard.of(cfg, self.rank)
        self.all_reduce = all_reduce
        self.scale = cfg.attn_scale or cfg.head_dim**-0.5
        # Gemma 2's attention-logit cap, passed only when set (a backend without softcap still runs the rest)
        self.attn_kw = {"softcap": cfg.attn_logit_softcap} if cfg.attn_logit_softcap else {}
        D = cfg.head_dim

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return weights[name]

        def cast(t: torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
            return t.to(device=device, dtype=dt or dtype).contiguous()

        def linear(t: torch.Tensor, blocks: Q4Blocks | Q8Blocks | None = None) -> Any:
            return backend.pack_linear(cast(t), blocks)

        def blocks_of(*parts: tuple[str, tuple[int, int] | None, tuple[int, int] | None]) -> Q4Blocks | Q8Blocks | None:
            """The quantized blocks of these ``(name, rows, cols)`` slices stacked by rows, or ``None`` when
            one has none (or its columns cut a block, or the slices mix 4- and 8-bit blocks)."""
            got = []
            for name, rows, cols in parts:
                b = (quant or {}).get(name)
                if b is not None and rows is not None:
                    b = b.rows(*rows)
                if b is not None and cols is not None:
                    b = b.cols(*cols)
                if b is None:
                    return None
                got.append(b)
            kind = type(got[0])
            return None if any(type(b) is not kind for b in got) else got[0] if len(got) == 1 else kind.cat(got)

        def norm(name: str) -> torch.Tensor:  # fp32; Gemma stores w - 1
            t = cast(w(name), torch.float32)
            return t + cfg.norm_offset if cfg.norm_offset else t

        (q0, q1), (k0, k1), (f0, f1) = self.shard.q_heads, self.shard.kv_heads, self.shard.ffn
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            q = w(p + "self_attn.q_proj.weight")[q0 * D : q1 * D]
            k = w(p + "self_attn.k_proj.weight")[k0 * D : k1 * D]
            v = w(p + "self_attn.v_proj.weight")[k0 * D : k1 * D]
            bias = None
            if cfg.qkv_bias:
                bias = cast(torch.cat([
                    w(p + "self_attn.q_proj.bias")[q0 * D : q1 * D],
                    w(p + "self_attn.k_proj.bias")[k0 * D : k1 * D],
                    w(p + "self_attn.v_proj.bias")[k0 * D : k1 * D],
                ]))
            qk_norm = {}
            if cfg.qk_norm:
                qk_norm = {"q_norm": norm(p + "self_attn.q_norm.weight"), "k_norm": norm(p + "self_attn.k_norm.weight")}
            o_bias = cast(w(p + "self_attn.o_proj.bias")) if cfg.o_bias and self.rank.rank == 0 else None
            moe = None
            if i in cfg.moe_layers:  # each expert's intermediate dim split across ranks like the dense FFN
                m0, m1 = self.shard.moe_slice(cfg, self.rank)
                ex = p + "mlp.experts."
                moe = MoEWeights(
                    router=cast(w(p + "mlp.gate.weight"), torch.float32),
                    gate_up=[linear(torch.cat([w(f"{ex}{e}.gate_proj.weight")[m0:m1],
                                               w(f"{ex}{e}.up_proj.weight")[m0:m1]])) for e in range(cfg.num_experts)],
                    down=[linear(w(f"{ex}{e}.down_proj.weight")[:, m0:m1]) for e in range(cfg.num_experts)],
                    top_k=cfg.experts_per_token, norm_topk_prob=cfg.norm_topk_prob,
                )
            self.layers.append(LayerWeights(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=linear(torch.cat([q, k, v]), blocks_of((p + "self_attn.q_proj.weight", (q0 * D, q1 * D), None),
                                                       (p + "self_attn.k_proj.weight", (k0 * D, k1 * D), None),
                                                       (p + "self_attn.v_proj.weight", (k0 * D, k1 * D), None))),
                qkv_bias=bias,
                o_proj=linear(w(p + "self_attn.o_proj.weight")[:, q0 * D : q1 * D],
                              blocks_of((p + "self_attn.o_proj.weight", None, (q0 * D, q1 * D)))),
                post_norm=norm(p + ("pre_feedforward_layernorm.weight" if cfg.sandwich_norms
                                    else "post_attention_layernorm.weight")),
                post_attn_norm=norm(p + "post_attention_layernorm.weight") if cfg.sandwich_norms else None,
                post_ffn_norm=norm(p + "post_feedforward_layernorm.weight") if cfg.sandwich_norms else None,
                local_rope=i in cfg.local_rope_layers,
                gate_up=None if moe else linear(torch.cat([w(p + "mlp.gate_proj.weight")[f0:f1],
                                                           w(p + "mlp.up_proj.weight")[f0:f1]]),
                                                blocks_of((p + "mlp.gate_proj.weight", (f0, f1), None),
                                                      (p + "mlp.up_proj.weight", (f0, f1), None))),
                down=None if moe else linear(w(p + "mlp.down_proj.weight")[:, f0:f1],
                                             blocks_of((p + "mlp.down_proj.weight", None, (f0, f1)))),
                moe=moe,
                o_bias=o_bias,
                **qk_norm,
            ))
        self.embed = cast(w("model.embed_tokens.weight"))
        self.norm = norm("model.norm.weight")
        head = weights.get("lm_head.weight")
        tied = cfg.tie_embeddings or head is None
        self.lm_head = linear(self.embed if tied else head,
                              blocks_of(("model.embed_tokens.weight" if tied else "lm_head.weight", None, None)))
        self.cos_sin = rotary_cos_sin_cache(D, cfg.max_position, cfg.rope_theta, cfg.rope_scaling).to(device)
        self.cos_sin_local = (rotary_cos_sin_cache(D, cfg.max_position, cfg.local_rope_theta).to(device)
                              if cfg.local_rope_layers else self.cos_sin)
        self.q_size = self.shard.num_q_heads * D
        self.kv_size = self.shard.num_kv_heads * D
        # The normed rows feed a linear layer that casts them to its weights' dtype: plain bf16/fp16 weights
        # (the GPU path) get them in that dtype straight from the norm, one kernel fewer each time (the same
        # bits: fp32 math, one rounding). Packed or quantized weights (CPU) keep the backend's own choice.
        qkv = self.layers[0].qkv if self.layers else None
        self.norm_out_dtype = (qkv.dtype if isinstance(qkv, torch.Tensor) and qkv.dtype != torch.float32
                               else None)
        # the backend's one-call decode layers over the last KV tensor seen (its data pointer and shape, then the
        # layers or None): see decode_layers
        self._decode_layers: tuple[tuple[int, ...], list[Any] | None] | None = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: torch.Tensor,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run all layers; ``kv`` is the engine's ``(2, layers, pages, page, kv_heads, D)`` tensor.

        ``layer_hook(i)`` runs as soon as layer ``i``'s new K/V are in the cache (the prefill side of
        a disaggregated handoff pushes that layer's pages from there).
        """
        cfg, be, D = self.cfg, self.backend, self.cfg.head_dim
        T = batch.num_tokens
        # NOTE: the residual stream stays fp32 whatever the weight dtype: SmolLM2's first answer
        # token is a near-tie that a bf16 residual flips ("L'Étoile…" instead of "The capital…").
        x = F.embedding(batch.input_ids, self.embed).float()
        if cfg.embed_scale != 1.0:
            x = x * cfg.embed_scale
        residual: torch.Tensor | None = None
        fused = self.decode_layers(kv) if batch.decode_only else None
        step = None if fused is None else be.decode_step(  # type: ignore[attr-defined]
            fused, x, batch.positions, batch.slot_mapping, batch.page_table, batch.seq_lens)
        if step is not None:  # a call a layer (fused is set): the kernels below, called from C
            for i, layer in enumerate(fused):  # type: ignore[arg-type]
                # the first call takes the embeddings as its residual (x None: no add before the norm)
                x, residual = be.decode_layer(layer, step, x if i else None, residual if i else x)  # type: ignore
                if layer_hook is not None:  # layer i's K/V are in the cache (its whole layer has run)
                    layer_hook(i)
        for i, lw in enumerate(self.layers if step is None else ()):
            # the residual add, the input norm and QKV (one kernel where the backend can)
            qkv, residual = be.norm_linear(x, residual, lw.input_norm, cfg.rms_eps, lw.qkv, lw.qkv_bias,
                                           self.norm_out_dtype)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = q.view(T, -1, D), k.view(T, -1, D)
            if lw.q_norm is not None and lw.k_norm is not None:
                q, k = be.rmsnorm(q, lw.q_norm, cfg.rms_eps), be.rmsnorm(k, lw.k_norm, cfg.rms_eps)
            k_cache, v_cache = kv[0, i], kv[1, i]
            q = be.rotary_store_kv(q, k, v.view(T, -1, D), batch.positions,
                                   self.cos_sin_local if lw.local_rope else self.cos_sin, k_cache, v_cache,
                                   batch.slot_mapping)
            if layer_hook is not None:
                layer_hook(i)
            if batch.decode_only:
                o = be.decode(q, k_cache, v_cache, batch.page_table, batch.seq_lens, self.scale, **self.attn_kw)
            else:
                o = be.extend(q, k_cache, v_cache, batch.page_table, batch.prefix_lens, batch.extend_lens,
                              self.scale, **self.attn_kw, extend_start=batch.extend_start,
                              max_extend=batch.max_extend)
            x = be.linear(o.reshape(T, -1), lw.o_proj, lw.o_bias)
            if self.all_reduce is not None:
                self.all_reduce(x)
            if lw.post_attn_norm is not None:
                x = be.rmsnorm(x, lw.post_attn_norm, cfg.rms_eps)
            if lw.moe is not None:  # NOTE: it routes on fp32 rows (`moe.route`): no early rounding there
                h, residual = be.fused_add_rmsnorm(x, residual, lw.post_norm, cfg.rms_eps)
                x = moe_forward(be, h, lw.moe)
            else:  # the residual add, the MLP's norm and gate/up (one kernel where the backend can)
                gate_up, residual = be.norm_linear(x, residual, lw.post_norm, cfg.rms_eps, lw.gate_up, None,
                                                   self.norm_out_dtype)
                if cfg.mlp_activation == "gelu_tanh":
                    x = be.linear(gelu_tanh_and_mul(gate_up), lw.down)
                else:
                    x = be.silu_mul_linear(gate_up, lw.down)
            if self.all_reduce is not None:
                self.all_reduce(x)
            if lw.post_ffn_norm is not None:
                x = be.rmsnorm(x, lw.post_ffn_norm, cfg.rms_eps)
        if residual is None:
            raise RuntimeError("model has no layers")
        last = (x + residual).index_select(0, batch.logit_rows)
        return be.rmsnorm(last, self.norm, cfg.rms_eps)

    def decode_layers(self, kv: torch.Tensor) -> list[Any] | None:
        """The backend's one-call decode layers over this KV tensor (built once), or ``None``: the backend has
        none, or a layer is not plain (biases, q/k norms, sandwich norms, experts, GeGLU, soft-capped
        attention, tensor parallelism)."""
        make = getattr(self.backend, "decode_layers", None)
        if make is None:
            return None
        key = (kv.data_ptr(), *kv.shape)
        if self._decode_layers is None or self._decode_layers[0] != key:
            cfg = self.cfg
            plain = (self.all_reduce is None and not self.attn_kw and cfg.mlp_activation == "silu"
                     and all(lw.qkv_bias is None and lw.o_bias is None and lw.q_norm is None and lw.k_norm is None
                             and lw.post_attn_norm is None and lw.post_ffn_norm is None and lw.moe is None
                             for lw in self.layers))
            self._decode_layers = (key, make([
                PlainLayer(lw.input_norm, lw.qkv, lw.o_proj, lw.post_norm, lw.gate_up, lw.down,
                           self.cos_sin_local if lw.local_rope else self.cos_sin, kv[0, i], kv[1, i],
                           self.shard.num_q_heads, cfg.rms_eps, self.scale)
                for i, lw in enumerate(self.layers)]) if plain else None)
        return self._decode_layers[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``(rows, vocab)`` from final hidden states."""
        logits = self.backend.linear(hidden, self.lm_head).float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): ``gelu_tanh(gate) * up`` of ``x = [gate, up]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)
