"""A naive Llama forward with no KV cache: the ground truth the paged engine must equal."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from appliance.model.loader import load_checkpoint


class NaiveLlama:
    """Full recompute of the whole sequence for every token; fp32; HF-named weights."""

    def __init__(self, model: str) -> None:
        ckpt = load_checkpoint(model)
        self.cfg = ckpt.config
        self.w = {k: v.float() for k, v in ckpt.weights.items()}

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps) * w

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # x: (heads, T, D)
        D = x.shape[-1]
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        ang = torch.outer(torch.arange(x.shape[1], dtype=torch.float64), inv).float()
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        c, w = self.cfg, self.w
        T, D = len(ids), c.head_dim
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            h = self._rms(x, w[p + "input_layernorm.weight"])

            def proj(name: str, h: torch.Tensor = h, p: str = p) -> torch.Tensor:
                return F.linear(h, w[p + f"self_attn.{name}.weight"], w.get(p + f"self_attn.{name}.bias"))

            q = proj("q_proj").view(T, c.num_heads, D).transpose(0, 1)
            k = proj("k_proj").view(T, c.num_kv_heads, D).transpose(0, 1)
            v = proj("v_proj").view(T, c.num_kv_heads, D).transpose(0, 1)
            q, k = self._rope(q), self._rope(k)
            k = k.repeat_interleave(c.group_size, 0)
            v = v.repeat_interleave(c.group_size, 0)
            scores = q @ k.transpose(1, 2) / D**0.5
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
            x = x + F.linear(o, w[p + "self_attn.o_proj.weight"])
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            g = F.linear(h, w[p + "mlp.gate_proj.weight"])
            u = F.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(F.silu(g) * u, w[p + "mlp.down_proj.weight"])
        x = self._rms(x, w["model.norm.weight"])
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return F.linear(x[-1], head)

    def greedy(self, ids: list[int], max_tokens: int, eos: set[int] | None = None) -> list[int]:
        out: list[int] = []
        for _ in range(max_tokens):
            t = int(self.logits(ids + out).argmax())
            out.append(t)
            if eos and t in eos:
                break
        return out
