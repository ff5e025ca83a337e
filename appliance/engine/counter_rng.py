"""Counter-based random numbers for seeded sampling: ``uniform(key)`` is a pure function of ``key``.

A seeded request's draw must depend on its seed and position only, never on its batch neighbours nor
on the device. SplitMix64's finalizer over the key gives one such number per row, on the host, for
nothing: the device sampler ships it with the row's other parameters and draws the token by inverse
CDF (`appliance.engine.device_sampler`), so a seeded batch costs no generator and no launch per row.
"""

from __future__ import annotations

M64 = (1 << 64) - 1
UNIFORM_BITS = 24  # float32's mantissa: every value exact on the device too


def mix64(z: int) -> int:
    """SplitMix64's finalizer: a bijection of the 64-bit words that scatters neighbouring inputs."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform(key: int) -> float:
    """A number in (0, 1] from ``key`` alone, on a grid of ``2**-UNIFORM_BITS`` (exact in float32)."""
    bits = mix64(key + 0x9E3779B97F4A7C15) >> (64 - UNIFORM_BITS)
    return (bits + 1) / (1 << UNIFORM_BITS)
