"""The host-side draws of seeded sampling: SplitMix64's finalizer, uniforms in (0, 1] exact in
float32, flat, and a pure function of the key."""

from __future__ import annotations

import struct

from appliance.engine.counter_rng import UNIFORM_BITS, mix64, uniform


def test_mix64_matches_splitmix64_known_outputs() -> None:
    # SplitMix64 seeded with 0 gives 0xE220A8397B1DCDAF first: the finalizer of the golden increment
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert mix64(0) == 0
    assert all(0 <= mix64(z) < 1 << 64 for z in (1, (1 << 64) - 1, -1, 1 << 70))


def test_uniforms_are_flat_in_the_half_open_interval() -> None:
    us = [uniform(k) for k in range(20000)]
    assert 0.0 < min(us) and max(us) <= 1.0
    counts = [0] * 10
    for u in us:
        counts[min(int(u * 10), 9)] += 1
    chi2 = sum((c - 2000) ** 2 / 2000 for c in counts)
    assert chi2 < 35.0, f"chi-square {chi2:.1f} over 9 degrees of freedom: not uniform"  # p ~ 1e-4


def test_a_key_always_gives_its_number_and_float32_keeps_it() -> None:
    assert uniform(12345) == uniform(12345)
    assert len({uniform(k) for k in range(1000)}) > 990, "neighbouring keys collide"
    for k in (0, 1, 1 << 61, 987654321):
        u = uniform(k)
        assert struct.unpack("f", struct.pack("f", u))[0] == u
        assert (u * (1 << UNIFORM_BITS)).is_integer()
