"""KV transfer backends; import them through `nvshmem_kv.create` (lazy: CUDA packages load only
when a GPU backend is created)."""
