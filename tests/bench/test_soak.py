"""bench.soak: a real `pdbox up` under rounds of `pdbox bench run`, each process's resident memory by kind
after each round; and the /proc readers it rests on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.proc_memory import KINDS, descendants, label, memory, tree_memory
from bench.soak import main
from tests.bench.test_startup import appliance_children


def test_memory_splits_the_resident_set_by_kind() -> None:
    mem = memory(os.getpid())
    assert set(mem) == {*KINDS, "rss"} and mem["rss"] == pytest.approx(sum(mem[k] for k in KINDS), abs=0.5)
    assert mem["libs"] > 0 and mem["heap"] + mem["anon"] > 0
    big = bytearray(64 * 2**20)  # 64 MiB, touched: anonymous memory
    big[::4096] = b"x" * len(big[::4096])
    assert memory(os.getpid())["anon"] >= mem["anon"] + 60
    del big


def test_a_process_tree_is_found_and_named() -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    child = subprocess.Popen([*sleep, "--name", "decode-7"])
    helper = subprocess.Popen([*sleep, "from multiprocessing.resource_tracker import main"])
    try:
        assert {child.pid, helper.pid} <= set(descendants(os.getpid()))
        assert label(child.pid) == "decode-7" and label(helper.pid) == "resource_tracker"
        tree = tree_memory(os.getpid())
        assert tree["decode-7"]["rss"] > 0 and len(tree) >= 3
    finally:
        for p in (child, helper):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_short_soak_reads_every_process_after_each_round(tmp_path, capsys) -> None:
    args = ["--mode", "unified", "--cpus", "0"]  # the embedded model: the workload's prompts fit its context
    assert main(["--rounds", "2", "--requests", "2", "--concurrency", "2", "--workload", "chat",
                 "--out", str(tmp_path), "--", *args]) == 0
    got = json.loads((tmp_path / "soak.json").read_text())
    assert [r["round"] for r in got["rounds"]] == [0, 1, 2] and got["rounds"][0]["run"] is None
    for r in got["rounds"][1:]:
        assert r["run"]["completed"] == 2 and r["run"]["failed"] == 0
    for r in got["rounds"]:
        names = {n.split("#")[0] for n in r["memory"]}
        assert {"router", "unified-0"} <= names <= {"router", "unified-0", "resource_tracker"}, r["memory"]
        assert all(m["rss"] > 0 for m in r["memory"].values())
        assert set(r["kv_pages_used"]) == {"unified-0"}
    assert {"router", "unified-0"} <= set(got["last_round_growth_mib"])
    assert "MiB over the last round" in capsys.readouterr().out
    assert appliance_children() == 0  # stopped before the bench returned


def test_the_port_is_the_bench_s(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path), "--", "--port", "8000"]) == 2
    assert "leave --port out" in capsys.readouterr().err
