"""Merge Prometheus text from several processes into one exposition (one HELP/TYPE per family)."""

from __future__ import annotations

from collections.abc import Iterable

_SUFFIXES = ("_bucket", "_count", "_sum")


def _family(sample_name: str, known: set[str]) -> str:
    for suf in _SUFFIXES:
        if sample_name.endswith(suf) and sample_name[: -len(suf)] in known:
            return sample_name[: -len(suf)]
    return sample_name


def merge_prometheus(texts: Iterable[str]) -> str:
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    order: list[str] = []
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    if name not in headers:
                        headers[name] = []
                        order.append(name)
                    if not any(h.startswith(f"# {parts[1]} ") for h in headers[name]):
                        headers[name].append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            fam = _family(name, set(headers))
            if fam not in headers:
                headers[fam] = []
                order.append(fam)
            samples.setdefault(fam, []).append(line)
    out: list[str] = []
    for fam in order:
        out += headers[fam] + samples.get(fam, [])
    return "\n".join(out) + "\n"
