"""The host-side launch arithmetic matches Triton's own functions it replaces."""

import triton

from fp4compile.kernels.triton.launch import cdiv, next_power_of_2


def test_launch_arithmetic_matches_triton():
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128, 4099):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    for n in (2**31 - 1, 2**31, 2**40 + 1):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        assert cdiv(n, 128) == triton.cdiv(n, 128)
