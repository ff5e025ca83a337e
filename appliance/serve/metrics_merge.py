"""Merge Prometheus text from several processes into one exposition (one HELP/TYPE per family).

Series keep their own labels (every process labels its samples with ``role`` and ``worker``), so
the merged text is what one scrape of each process would give, grouped by family.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

_SUFFIXES = ("_bucket", "_count", "_sum")


def _family(sample_name: str, known: Container[str]) -> str:
    for suf in _SUFFIXES:
        if sample_name.endswith(suf) and sample_name[: -len(suf)] in known:
            return sample_name[: -len(suf)]
    return sample_name


def merge_prometheus(texts: Iterable[str]) -> str:
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    have = headers.setdefault(parts[2], [])
                    if not any(h.startswith(f"# {parts[1]} ") for h in have):
                        have.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            fam = _family(name, headers)
            headers.setdefault(fam, [])
            samples.setdefault(fam, []).append(line)
    out: list[str] = []
    for fam, head in headers.items():
        out += head + samples.get(fam, [])
    return "\n".join(out) + "\n"
