"""Integer arithmetic for launch grids and tile sizes, on the host.

Plain Python rather than ``triton.cdiv`` and ``triton.next_power_of_2``: those go through
Triton's constexpr-function wrapper, about 4.5 us a call on a CPU core against 0.1 us (measured),
and a linear layer's launch makes six such calls, a third of its Python path when its kernels are
not waited for (eager decoding; under CUDA graphs the host path does not run).
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0 (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two at or above n, 0 for n <= 0 (``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
