"""How fast can a kernel *read* an fp4 weight in the fp4 GEMM's tile pattern? (GPU probe)

Reads a packed (N, K/2) weight in (BLOCK_N rows x BLOCK_BYTES) tiles, K split over programs like
the decode GEMM, and only sums the bytes: the bandwidth the access pattern allows, apart from any
decode work. Compared with a device-to-device copy in the same run.

    python benchmarks/probe_bandwidth.py
"""

import torch
import triton
import triton.language as tl

from timing import time_ms


@triton.jit
def _read_tiles(w_ptr, out_ptr, N, HALF_K, BYTES_PER_SPLIT, BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * BYTES_PER_SPLIT
    # The bytes feed an bf16 dot with a constant (the bytes read as bf16 pairs), so Triton pipelines the loads (cp.async) as in
    # the GEMM, and the tensor cores do the only "work".
    ones = tl.full((BLOCK_BYTES // 2, 16), 1.0, dtype=tl.bfloat16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for b0 in range(start, start + BYTES_PER_SPLIT, BLOCK_BYTES):
        cols = b0 // 2 + tl.arange(0, BLOCK_BYTES // 2)
        tile = tl.load(w_ptr.to(tl.pointer_type(tl.bfloat16)) + rows[:, None] * (HALF_K // 2) + cols[None, :])
        acc = tl.dot(tile, ones, acc)
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


def main() -> None:
    print(torch.cuda.get_device_name())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in ((57344, 8192), (4096, 14336)):
        weights = [torch.randint(0, 0x70, (n, k // 2), dtype=torch.uint8, device="cuda") for _ in range(2)]  # finite e4m3
        nbytes = n * k // 2
        copy_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        copy_dst = torch.empty_like(copy_src)
        t = time_ms(lambda i: copy_dst.copy_(copy_src), 1, True)
        print(f"{n}x{k}: device copy {2 * nbytes / (t * 1e-3) / 1e9:.0f} GB/s (read + write)")
        for block_n, block_bytes, stages, warps in ((128, 64, 4, 4), (64, 128, 3, 4), (32, 256, 3, 4), (16, 512, 3, 4),
                                                    (8, 1024, 3, 4), (64, 128, 5, 4), (128, 128, 3, 8)):
            for per_sm in (2, 4):
                tiles = triton.cdiv(n, block_n)
                splits = max(1, min(per_sm * sms // tiles, k // 2 // block_bytes))
                while (k // 2) % (splits * block_bytes):
                    splits -= 1
                out = torch.empty(tiles * splits, dtype=torch.float32, device="cuda")
                run = lambda i: _read_tiles[(tiles, splits)](weights[i], out, n, k // 2, k // 2 // splits,  # noqa: E731
                                                             BLOCK_N=block_n, BLOCK_BYTES=block_bytes, num_stages=stages,
                                                             num_warps=warps)
                t = time_ms(run, 2, True)
                print(f"  rows {block_n:>3} x {block_bytes:>4} B, {stages} stages, {warps} warps, {splits:>3} splits "
                      f"({tiles * splits / sms:.1f} programs/SM): {nbytes / (t * 1e-3) / 1e9:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
