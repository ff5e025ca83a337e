"""Frozen, typed configuration for the model, the engine and serving.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` with a sentence a user
can act on; nothing here is an ``assert``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are scaled: a checkpoint's ``rope_parameters`` / ``rope_scaling``.

    The formulas are in ``kernels.rope_scaling``. ``original_max_position`` is the context the model was
    pre-trained on (llama3, yarn: ``original_max_position_embeddings``; dynamic: ``max_position_embeddings``,
    as transformers reads them). ``freq_factors`` (GGUF's ``rope_freqs`` tensor: Llama 3.1's llama3 scaling
    as llama.cpp stores it) divide each inverse frequency after the type's own formula.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.freq_factors and (self.rope_type not in ("default", "linear")
                                  or not all(math.isfinite(f) and f > 0 for f in self.freq_factors)):
            raise ValueError(f"per-frequency rope factors must be numbers > 0 on a default or linear rope, "
                             f"got type {self.rope_type!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}: pdbox supports {', '.join(ROPE_TYPES)}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"rope type {self.rope_type!r}: factor must be a number > 0, got {self.factor!r}")
        if self.rope_type in ("dynamic", "yarn", "llama3") and self.original_max_position < 1:
            raise ValueError(f"rope type {self.rope_type!r} needs the pre-trained context length "
                             f"(original_max_position >= 1), got {self.original_max_position}")
        if self.rope_type == "llama3" and self.high_freq_factor == self.low_freq_factor:
            raise ValueError("rope type 'llama3': high_freq_factor must differ from low_freq_factor, "
                             f"both are {self.low_freq_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    ``rope_scaling`` is the rope type and its fields (``kernels.rope_scaling``); ``max_position`` is the
    context the engine serves (for dynamic and yarn scaling, the extended one). ``qk_norm``: RMSNorm over
    each head of q and k before rotary (Qwen3).
    """

    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling = RopeScaling()
    qk_norm: bool = False
    # mixture of experts (Qwen3-MoE): the layers in moe_layers route each token to experts_per_token experts
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    # Gemma 3: embeddings times embed_scale (sqrt(hidden)); RMSNorm weights stored as w - 1 (norm_offset 1);
    # sandwich norms (after attention, before and after the FFN); GeGLU; its own attention scale; the
    # local_rope_layers rotate with local_rope_theta (plain rope), the others with rope_theta + rope_scaling.
    embed_scale: float = 1.0
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    attn_scale: float | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None  # Gemma 2: attention scores become cap * tanh(scores / cap)
    local_rope_theta: float = 10000.0
    local_rope_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported architecture {self.arch!r}: pdbox runs {', '.join(SUPPORTED_ARCHS)}"
            )
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config {name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unsupported MLP activation {self.mlp_activation!r}: "
                             f"pdbox runs {', '.join(MLP_ACTIVATIONS)}")
        moe_ok = 1 <= self.experts_per_token <= self.num_experts and self.moe_intermediate_size >= 1
        if self.moe_layers and not moe_ok:
            raise ValueError(f"mixture of experts needs 1 <= experts_per_token ({self.experts_per_token}) <= "
                             f"num_experts ({self.num_experts}) and moe_intermediate_size >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads


DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: see appliance.engine.dtype.default_dtype
# NOTE: 1 GiB holds ~22K tokens of SmolLM2's fp32 KV: 48 chat requests of 350 tokens at once (256 MiB
# held 15 of them, and the rest of a 48-request burst waited for pages until the router gave up).
DEFAULT_KV_CACHE_MB = 1024
CPU_PREFILL_CHUNK = 256  # tokens per prefill step on CPU (see EngineConfig.prefill_chunk)
GPU_PREFILL_CHUNK = 2048
DEFAULT_PAGE_SIZE = 16  # tokens per KV page: the engine's (EngineConfig) and the router's (cache-aware routing)
ATTENTION_BACKENDS = ("auto", "cpu", "torch", "triton")
TP_BACKENDS = ("auto", "nccl", "gloo")  # auto: NCCL on CUDA, gloo on CPU (appliance.engine.tp.group_backend)


@dataclass(frozen=True)
class Flag:
    """How an `EngineConfig` field appears on the command lines (`pdbox up`, the worker, `pdbox slurm`):
    as ``--field-name`` (a bool as ``--field-name/--no-field-name``), typed as its default.
    ``cli_default`` (None: the field's default) is the command line's own default where it is not the
    field's (``"auto"``: decided per worker, see `appliance.engine_flags.engine_config`).
    `appliance.engine_flags` derives the options, the worker's argv and the config from these."""

    help: str
    choices: tuple[str, ...] = ()
    cli_default: Any = None
    envvar: str | None = None  # an environment variable the command line also reads


def flag(default: Any, help: str, **kw: Any) -> Any:
    """A config field with a command-line flag (see `Flag`): `EngineConfig`'s, and `RouterConfig`'s."""
    return field(default=default, metadata={"flag": Flag(help, **kw)})


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (all its TP ranks) runs a model.

    ``num_pages`` sizes the single KV tensor; when 0 it is derived from ``kv_cache_mb``.
    ``max_prefill_tokens`` is the chunked-prefill token budget per step; 0 picks it by device
    (`prefill_chunk`). ``dtype="auto"`` resolves here, once, to the device's default
    (``appliance.engine.dtype.default_dtype``), so ``config.dtype`` always names the dtype in use.
    The fields made with `flag` are the engine's command-line flags: adding one here (and using it in
    the engine) adds it to `pdbox up`, the worker and `pdbox slurm` (`appliance.engine_flags`).
    """

    dtype: str = flag("auto", "auto: bfloat16 on CUDA and on CPUs with bf16 instructions, float32 on other CPUs",
                      choices=DTYPE_CHOICES)
    kv_dtype: str | None = None
    device: str = "cpu"
    page_size: int = flag(DEFAULT_PAGE_SIZE, "Tokens per KV page (a power of two).")
    num_pages: int = 0
    kv_cache_mb: int = flag(DEFAULT_KV_CACHE_MB, "KV pool size per engine rank.")
    max_running: int = flag(64, "Requests an engine runs at once.")
    max_prefill_tokens: int = flag(0, "Chunked-prefill token budget per step (0: 256 on CPU, 2048 on CUDA); "
                                   "a prompt's last chunk may run a quarter over it rather than leave a sliver.")
    max_model_len: int = 0
    enable_prefix_cache: bool = True
    attention_backend: str = flag("auto", "Attention kernels (auto: by device).",
                                  choices=ATTENTION_BACKENDS)
    q4_kernels: bool = flag(True, "CPU: decode steps of a few rows read a GGUF's Q4_0/Q4_1 weights as 4-bit "
                                  "blocks (pdbox's AVX2 kernel on rows rounded to int16, up to 8 rows in fp32 and 4 in "
                                  "bf16; else torch's int4 kernel on bf16 rows, up to 4) instead of the floats.")
    native_kernels: bool = flag(True, "CPU: pdbox's own C kernels (built with the machine's cc on first use): in bf16 "
                                      "attention, RMSNorm, rotary and SiLU (AVX-512 BF16), and the 4-bit GEMV (AVX2), "
                                      "instead of torch's ops.")
    tp_size: int = 1
    # the TP group's collectives; under gloo a CUDA engine's ranks may share one GPU (checks on one GPU)
    tp_backend: str = "auto"
    # the longest a TP step's collectives, or a follower's wait for rank 0's next command, may take (rank 0
    # pings while idle: `appliance.engine.tp.Keepalive`); the ranks' rendezvous waits longer (TP_JOIN_S)
    tp_timeout_s: float = 300.0
    threads: int = 0
    seed: int = 0
    prefill_order: str = flag("fifo", "Prefill queue order: earliest TTFT deadline first, or arrival "
                              "(auto: slack on prefill engines).", choices=("auto", "fifo", "slack"),
                              cli_default="auto")
    # decode under CUDA graphs; used only on CUDA (triton backend, tp 1)
    cuda_graphs: bool = flag(True, "GPU: decode under CUDA graphs captured at start-up (batch sizes 1, 2, 4 ... 256).")
    cuda_graph_batches: tuple[int, ...] = ()  # the captured batch sizes; () = 1, 2, 4 ... 256 (graph_plan)

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            from appliance.engine.dtype import default_dtype

            object.__setattr__(self, "dtype", default_dtype(self.device))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(DTYPES)}, got {self.kv_dtype!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {self.page_size}")
        if self.num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {self.num_pages}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_prefill_tokens < 0:
            raise ValueError(f"max_prefill_tokens must be >= 0 (0: by device), got {self.max_prefill_tokens}")
        if self.tp_backend not in TP_BACKENDS:
            raise ValueError(f"tp_backend must be one of {', '.join(TP_BACKENDS)}, got {self.tp_backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.prefill_order not in ("fifo", "slack"):
            raise ValueError(f"prefill_order must be fifo or slack, got {self.prefill_order!r}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not self.tp_timeout_s > 0:
            raise ValueError(f"tp_timeout_s must be > 0, got {self.tp_timeout_s}")
        if any(not isinstance(b, int) or b < 1 for b in self.cuda_graph_batches):
            raise ValueError(f"cuda_graph_batches must be integers >= 1, got {self.cuda_graph_batches!r}")

    @property
    def cache_dtype(self) -> str:
        return self.kv_dtype or self.dtype

    @property
    def prefill_chunk(self) -> int:
        """The chunked-prefill budget: ``max_prefill_tokens``, or by device when it is 0.

        The chunk bounds how long a short prompt queued behind a long one, and every running decode,
        wait for the next step. On CPU, prefill speed is flat from 128 to 512 tokens a chunk (1 thread,
        SmolLM2-135M: 509 / 532 / 467 tok/s), so a small chunk costs nothing; a GPU needs thousands
        of tokens a step to fill its cores.
        """
        if self.max_prefill_tokens:
            return self.max_prefill_tokens
        return CPU_PREFILL_CHUNK if self.device.startswith("cpu") else GPU_PREFILL_CHUNK


@dataclass(frozen=True)
class RankInfo:
    """Where one tensor-parallel rank sits: its rank, the world size and the shard it owns."""

    rank: int = 0
    world_size: int = 1
    dist_init: str = field(default="", repr=False)

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        """KV heads ``[start, end)`` owned by this rank.

        NOTE: ranks split heads by ``r*H//t``; when ``t > H`` each rank holds ONE replicated head
        ``r*H//t``. nvshmem_kv uses the same rule to slice heads across mixed TP.
        """
        t, h, r = self.world_size, num_kv_heads, self.rank
        if t <= h:
            return r * h // t, (r + 1) * h // t
        head = r * h // t
        return head, head + 1
