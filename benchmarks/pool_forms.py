"""The soft max-pool's backward against a closed form built from sum pooling (issue 17's idea).

    python benchmarks/pool_forms.py [--batches 1 8] [--repeats 9] [--temperature 0.3]

On ResNet-50's pool (64 channels, 112 x 112, 3 x 3, stride 2, padding 1), at the input of a
ReLU with random values, the engine's ``soft_max_pool_backward`` (each window centred on its own
maximum, on stride-phase planes) against the closed form, in float32 and float64, interleaved:

    E = exp((x - c) / T) with c each map's maximum,  Z = sumpool(E),  a = g / Z
    detached:        grad = E * sumpool*(a)
    differentiated:  grad = E * ((1 + s) * sumpool*(a) - sumpool*(a * sumpool(E * s) / Z))

where s = (x - c) / T, sumpool is ``avg_pool2d`` with ``divisor_override=1`` and sumpool* its
adjoint. One ``exp`` per input value instead of one per window entry (2.25 times fewer here),
and no per-window loop in Python. Its price: one shift per map instead of one per window, so it
holds only while (max - min) / T stays within the dtype's exponent range (about 80 in float32),
and the differentiated form cancels terms of size |s|. Errors are the largest relative error
against the engine in float64. Ratios, not seconds, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from pullback_widgets.gates import PoolGeometry, soft_max_pool_backward

GEOMETRY = PoolGeometry.of(3, 2, 1)


def _sum_pool(t: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(t, 3, 2, 1, count_include_pad=True, divisor_override=1)


def _sum_pool_adjoint(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.avg_pool2d_backward(a, like, [3, 3], [2, 2], [1, 1], False, True, 1)


def closed_form_pool_backward(grad_out: torch.Tensor, x: torch.Tensor, temperature: float,
                              detached: bool = False,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The soft pool's gradient for 3 x 3, stride 2, padding 1 by sum pooling: (N, C, H, W)."""
    values = x.to(dtype)
    scaled = (values - values.amax(dim=(2, 3), keepdim=True)).mul_(1.0 / temperature)
    weights = torch.exp(scaled)
    total = _sum_pool(weights)
    share = grad_out.to(dtype) / total
    if detached:
        return (weights * _sum_pool_adjoint(share, weights)).to(x.dtype)
    mean_share = share * _sum_pool(weights * scaled) / total
    spread = scaled.add_(1.0).mul_(_sum_pool_adjoint(share, weights))
    return (weights * spread.sub_(_sum_pool_adjoint(mean_share, weights))).to(x.dtype)


def largest_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs() + 1e-3 * float(expected.abs().max())
    return float(((actual.double() - expected).abs() / scale).max())


def compare(batch: int, repeats: int, temperature: float) -> list[str]:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(batch, 64, 112, 112) * 2)
    grad_out = torch.randn(batch, 64, 56, 56)
    rows = []
    for detached in (False, True):
        forms = {
            "engine": partial(soft_max_pool_backward, grad_out, x, GEOMETRY, temperature,
                              detached),
            "closed form, float32": partial(closed_form_pool_backward, grad_out, x,
                                            temperature, detached),
            "closed form, float64": partial(closed_form_pool_backward, grad_out, x,
                                            temperature, detached, torch.float64),
        }
        reference = soft_max_pool_backward(grad_out.double(), x.double(), GEOMETRY, temperature,
                                           detached)
        errors = {name: largest_relative_error(form(), reference) for name, form in forms.items()}
        times: dict[str, list[float]] = {name: [] for name in forms}
        for repeat in range(repeats):
            for name in (list(forms) if repeat % 2 == 0 else list(forms)[::-1]):
                start = time.perf_counter()
                forms[name]()
                times[name].append(time.perf_counter() - start)
        for name in forms:
            ratios = [t / e for t, e in zip(times[name], times["engine"])]
            rows.append(f"| {batch} | {'detached' if detached else 'differentiated'} | {name} | "
                        f"{1e3 * statistics.median(times[name]):.1f} | "
                        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
                        f" | {errors[name]:.1e} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--temperature", type=float, default=0.3)
    args = parser.parse_args(argv)
    print("| batch | weights | form | ms | ÷ engine, median (range) | largest relative error |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for row in compare(batch, args.repeats, args.temperature):
            print(row, flush=True)
    print(f"\n{args.repeats} repeats, T = {args.temperature}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
