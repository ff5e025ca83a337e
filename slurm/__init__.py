"""Slurm mode (docs/design.md §5): prefill and decode pools as submitit jobs that register with the router.

jobs      PoolSpec, submit_pool, job_states/cancel      task      per-rank supervisor (PoolTask)
registry  router-side Registry + make_registry_app      register  worker-side register/deregister
messages  WorkerInfo and the other wire messages         runstate  run directory and run.json
commands  worker_argv / router_argv hooks                script    render_sbatch (one allocation)
cli       `pdbox slurm up|status|down|script`            local-cluster.sh  a real Slurm on one host
"""
