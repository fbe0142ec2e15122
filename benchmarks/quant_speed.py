"""8-bit blockwise codec speed: library.hina.quant (eager and torch.compile'd) vs bitsandbytes.

Times one encode + decode round trip (or, with ``--encode-only`` / ``--decode-only``, one encode / one decode of
codes encoded beforehand) of a flat float32 state
(default 1M elements, unsigned map, like Adam's second moment) and prints nanoseconds per element, median of
``--repeats`` runs after warm-up:

    OMP_NUM_THREADS=2 python benchmarks/quant_speed.py [--n 1048576] [--block 2048] [--device cpu]
                                                      [--signed] [--encode-only | --decode-only] [--threads N]
                                                      [--repeats 30]

Read the ratios between rows of one run, not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from library.hina import quant  # noqa: E402


def _median_ns_per_element(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e9 / x.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1 << 20)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--signed", action="store_true", help="signed map (first moment); default unsigned")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--encode-only", action="store_true", help="time the encode alone, not the round trip")
    only.add_argument("--decode-only", action="store_true", help="time the decode alone, not the round trip")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.n <= 0 or args.n % args.block:
        parser.error(f"--n {args.n} must be a positive multiple of --block {args.block}")
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(args.n, device=args.device) * torch.exp(2 * torch.randn(args.n, device=args.device))
    if not args.signed:
        x = x.square()
    qmap = quant.dynamic_map(args.signed, args.device)

    encoded = quant.encode(x, qmap, args.block, args.signed)  # what --decode-only decodes

    def ours(values):
        if args.decode_only:
            return quant.decode(*encoded, qmap, args.block)
        codes, absmax = quant.encode(values, qmap, args.block, args.signed)
        return codes if args.encode_only else quant.decode(codes, absmax, qmap, args.block)

    rows = [("hina quant, eager", ours), ("hina quant, torch.compile", torch.compile(ours, dynamic=False))]
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_encoded = bnb_functional.quantize_blockwise(x, code=qmap, blocksize=args.block)

        def theirs(values):
            if args.decode_only:
                return bnb_functional.dequantize_blockwise(*bnb_encoded)
            codes, state = bnb_functional.quantize_blockwise(values, code=qmap, blocksize=args.block)
            return codes if args.encode_only else bnb_functional.dequantize_blockwise(codes, state)

        rows.append(("bitsandbytes quantize/dequantize_blockwise", theirs))
    except ImportError:
        print("bitsandbytes not installed: its row is skipped")

    timed = "encode" if args.encode_only else "decode" if args.decode_only else "encode + decode"
    print(f"device {args.device}, threads {torch.get_num_threads()}, n {args.n}, block {args.block}, "
          f"{'signed' if args.signed else 'unsigned'} map; {timed}, ns/element (median of {args.repeats})")
    for label, fn in rows:
        print(f"  {label:45s} {_median_ns_per_element(fn, x, args.repeats):8.2f}")


if __name__ == "__main__":
    main()
