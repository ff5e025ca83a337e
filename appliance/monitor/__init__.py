"""The live monitor: `pdbox monitor` and the dashboard `pdbox up` shows on a TTY.

``prom`` parses Prometheus text, ``snapshot`` turns the router's /metrics and /workers into a
``Frame`` (with windowed rates from a short history), ``view`` renders a frame with rich, ``live``
runs the refresh loop (Live on a TTY, plain frames otherwise, one frame with ``--once``).
"""
