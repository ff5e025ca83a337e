"""What the Prometheus plumbing costs: record, write (prometheus_client), merge, parse.

``python -m bench.prom_cost`` prints microseconds per call for a worker-sized registry (20 gauges,
6 histograms) and for the merge of five such texts, by this project's line grouping
(``metrics_merge``) and by prometheus_client's parser and writer. The router merges on the event
loop that relays every token; the numbers are why that merge is written by hand.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable, Iterable

import prometheus_client as prom
from prometheus_client.parser import text_string_to_metric_families

from appliance.monitor.prom import parse
from appliance.serve.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry
from appliance.serve.metrics_merge import merge_prometheus


def per_call_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def worker_registry() -> Registry:
    r = Registry(role="decode", worker="decode-0")
    for i in range(20):
        r.gauge(f"pdbox_gauge_{i}", "a gauge").set(i)
    for i in range(6):
        h = r.histogram(f"pdbox_hist_{i}_seconds", "a histogram", LATENCY_BUCKETS)
        for v in (0.01, 0.1, 1.0):
            h.observe(v)
    return r


class _Families:
    def __init__(self, families: Iterable) -> None:
        self.families = list(families)

    def collect(self) -> Iterable:
        return self.families


def merge_with_prometheus_client(texts: list[str]) -> str:
    merged: dict = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name in merged:
                merged[fam.name].samples.extend(fam.samples)
            else:
                merged[fam.name] = fam
    return prom.generate_latest(_Families(merged.values())).decode()


def main() -> None:
    r = worker_registry()
    itl = r.histogram("pdbox_itl_seconds", "ITL", TOKEN_LATENCY_BUCKETS)
    write = r.histogram("pdbox_transfer_write_seconds", "write", LATENCY_BUCKETS, ("backend",))
    tokens = r.counter("pdbox_decode_tokens_total", "tokens")
    print(f"record: observe {per_call_us(lambda: itl.observe(0.03), 100_000):.2f} us, "
          f"observe with a label {per_call_us(lambda: write.observe(1e-4, backend='shm'), 100_000):.2f} us, "
          f"inc {per_call_us(lambda: tokens.inc(3), 100_000):.2f} us")
    text = r.render()
    print(f"write: {per_call_us(r.render, 500):.0f} us for {len(text.splitlines())} lines")
    texts = [text] * 5
    merged = merge_prometheus(texts)
    print(f"merge of 5: line grouping {per_call_us(lambda: merge_prometheus(texts), 100):.0f} us, "
          f"prometheus_client parse + write {per_call_us(lambda: merge_with_prometheus_client(texts), 20):.0f} us")
    print(f"parse the merged {len(merged.splitlines())} lines (monitor, bench): "
          f"{per_call_us(lambda: parse(merged), 20):.0f} us")


if __name__ == "__main__":
    main()
