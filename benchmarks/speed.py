"""Speed and memory of a one-shot pullback against a plain input gradient, as ratios of one run.

    python benchmarks/speed.py [--device cpu|cuda] [--models resnet50 efficientnet_lite0]
                               [--batches 1 8] [--repeats 7] [--session] [--profile]
                               [--decompose] [--no-memory] [--keep-heap] [--out FILE]

r1 = excitation_pullback ÷ plain input gradient (goal ≤ 1.10), on (batch, 3, 224, 224) inputs,
ResNet-50 with random weights and EfficientNet-Lite0 with its packaged ImageNet weights (random
weights, with a note, where that package is missing): nothing is downloaded. The two methods are
interleaved, alternating which goes first, so machine noise hits them alike; r1 is the median of
the per-repeat ratios, with their range, in wall-clock time and in the process's CPU time (all
threads; less sensitive to waiting for a core on a shared machine, though not to cache
contention). ``--session`` adds the session columns (an update at a new temperature, 5
targets batched and looped). ``--decompose`` adds three floors, interleaved with the rest: a
plain gradient under a function mode that only passes each call on (what any interception of the
forward costs), the pullback with ``gate="hard"`` (the whole engine without its soft
arithmetic: the gap from there to r1 is that arithmetic), and one ``torch.sigmoid`` pass over
the model's own gated pre-activations (the soft gate's transcendental work, which no fusion
removes: one sigmoid per ReLU pre-activation; a ReLU6's two-sided gate takes two, or, fused,
one exponential and a division). Memory: the peak of one pullback against one gradient, each
in a fresh process on CPU (peak RSS, whole process and above the loaded model),
``torch.cuda.max_memory_allocated`` on CUDA. Minor page faults per call are
counted for both methods; ``--keep-heap`` times with glibc keeping freed memory (a diagnostic:
batch-8 pullbacks make glibc trim and regrow its heap). Ratios, not seconds, are what to compare
across machines.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

try:
    import resource
except ImportError:  # not on Windows: no fault counts there
    resource = None

import pullback_widgets as pw

MODELS = ("resnet50", "efficientnet_lite0")


def load(name: str, device: str) -> tuple[torch.nn.Module, str]:
    """(model, how its weights were made): Lite0 from the weights package, others random."""
    if name == "efficientnet_lite0":
        try:
            return pw.load_model(name, weights="imagenet", device=device), "ImageNet"
        except pw.models.WeightsUnavailableError:
            pass
    return pw.load_model(name, weights=None, device=device), "random"


def plain_gradient(model, x: torch.Tensor, target: int) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


class _PassThrough(TorchFunctionMode):
    """A function mode that only calls each function: what any interception costs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _gradient_under_a_mode(model, x: torch.Tensor, target: int) -> torch.Tensor:
    with _PassThrough():
        return plain_gradient(model, x, target)


_GATED_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh)


def gated_pre_activations(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Copies of the pre-activations of every ReLU-family gate in one forward of ``model`` on
    ``x``, taken before an in-place op overwrites them: what the soft gates evaluate sigmoid
    on. Both models call their ReLUs as modules; the count is checked against the gates the
    engine softens."""
    seen: list[torch.Tensor] = []
    handles = [module.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
               for module in model.modules() if isinstance(module, _GATED_MODULES)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    gated = pw.PullbackSession(model, x[:1]).gated_kinds.get("relu", 0)
    if len(seen) != gated:
        raise SystemExit(f"found {len(seen)} ReLU-family calls, the engine gates {gated}")
    return seen


def _operations(model, x: torch.Tensor, session_columns: bool,
                decompose: bool = False) -> dict[str, Callable]:
    temperature = pw.model_helpers.default_temperature(model)
    operations = {
        "gradient": lambda: plain_gradient(model, x, 1),
        "pullback": lambda: pw.excitation_pullback(model, x, 1, temperature=temperature),
    }
    if decompose:
        operations.update({
            "gradient under a mode": lambda: _gradient_under_a_mode(model, x, 1),
            "hard pullback": lambda: pw.excitation_pullback(model, x, 1, gate="hard"),
        })
        pre_activations = gated_pre_activations(model, x)
        operations["sigmoid pass"] = lambda: [torch.sigmoid(z) for z in pre_activations]
    if session_columns:
        session = pw.PullbackSession(model, x, temperature=temperature)
        operations.update({
            "session update": lambda: session.pullback(1, temperature=temperature * 1.01),
            "5 targets batched": lambda: session.pullbacks([1, 2, 3, 4, 5], batched=True),
            "5 targets loop": lambda: session.pullbacks([1, 2, 3, 4, 5], batched=False),
        })
    return operations


def _minor_faults() -> int:
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], object], device: str) -> tuple[float, float, int]:
    """(wall-clock seconds, CPU seconds of this process, minor page faults) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu, faults = time.perf_counter(), time.process_time(), _minor_faults()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, _minor_faults() - faults


def keep_heap() -> None:
    """A diagnostic, for this process only: glibc keeps freed memory for reuse instead of
    trimming the heap and faulting the pages in again (malloc's M_TRIM_THRESHOLD and
    M_MMAP_THRESHOLD raised). The package itself never changes the allocator."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError, TypeError):
        mallopt = None
    if mallopt is None or not (mallopt(m_mmap_threshold, 1 << 30)
                               and mallopt(m_trim_threshold, 1 << 31)):
        raise SystemExit("--keep-heap needs glibc's mallopt")


def measure(model, batch: int, repeats: int, device: str, session_columns: bool = False,
            decompose: bool = False) -> dict[str, list[tuple[float, float, int]]]:
    """(wall, CPU seconds, minor page faults) of each operation per repeat, the operations
    interleaved, their order alternating from one repeat to the next."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, device=device)
    operations = _operations(model, x, session_columns, decompose)
    for fn in operations.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in operations}
    names = list(operations)
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            times[name].append(_timed(operations[name], device))
    return times


def peak_memory(name: str, batch: int, method: str, device: str) -> dict[str, float]:
    """Peak memory (MB) of one ``method`` call: ``peak`` and ``above_model`` (the peak less
    what the process held before the call)."""
    if device == "cpu":  # RSS never shrinks within a process: one fresh process per figure
        probe = subprocess.run(
            [sys.executable, __file__, "--memory-probe", name, str(batch), method],
            capture_output=True, text=True, check=True, env=os.environ.copy())
        return json.loads(probe.stdout.strip().splitlines()[-1])
    model, _ = load(name, device)
    x = torch.rand(batch, 3, 224, 224, device=device)
    operation = _operations(model, x, False)[method]
    operation()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    operation()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak": peak / 2**20, "above_model": (peak - before) / 2**20}


def profile_summary(model, batch: int, device: str, calls: int = 5, top: int = 12) -> str:
    """Where the difference goes: the ops (on CUDA the kernels, names cut at 80 characters)
    whose self time per call (``torch.profiler``, mean of ``calls`` calls after a warm-up)
    differs most between a pullback and a gradient, as a markdown table; the first row is the
    total of all their self times."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, device=device)
    operations = _operations(model, x, False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    per_op = {}
    for name, fn in operations.items():
        fn()
        with profile(activities=activities) as recorded:
            for _ in range(calls):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        if device == "cuda":  # the kernels themselves (ops would count their kernels again)
            per_op[name] = {event.key[:80]: event.self_device_time_total / calls / 1e3
                            for event in recorded.key_averages()
                            if event.device_type == torch.autograd.DeviceType.CUDA}
        else:
            per_op[name] = {event.key: event.self_cpu_time_total / calls / 1e3
                            for event in recorded.key_averages()}
    gradient, pullback = per_op["gradient"], per_op["pullback"]
    keys = sorted(set(gradient) | set(pullback),
                  key=lambda k: -abs(pullback.get(k, 0.0) - gradient.get(k, 0.0)))
    clock = "device" if device == "cuda" else "CPU"
    lines = [f"| op | gradient ms | pullback ms | difference ms ({clock} self time) |",
             "|---|---|---|---|",
             f"| all ops | {sum(gradient.values()):.2f} | {sum(pullback.values()):.2f} | "
             f"{sum(pullback.values()) - sum(gradient.values()):+.2f} |"]
    for key in keys[:top]:
        a, b = gradient.get(key, 0.0), pullback.get(key, 0.0)
        lines.append(f"| `{key}` | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return "\n".join(lines)


def _proc_status_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _rss_probe(name: str, batch: int, method: str) -> None:
    """Prints the peak RSS (MB) of one call; Linux only (it resets the peak through
    /proc/self/clear_refs, so that loading the model does not count)."""
    model, _ = load(name, "cpu")
    x = torch.rand(batch, 3, 224, 224)
    with torch.no_grad():  # the allocators' first use, outside the measured call
        model(x)
    operation = _operations(model, x, False)[method]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status_mb("VmRSS")
    operation()
    peak = _proc_status_mb("VmHWM")
    print(json.dumps({"peak": peak, "above_model": peak - before}))


def _ratio_cell(numerator: list[tuple], denominator: list[tuple], clock: int = 0) -> str:
    """Median (range) of the per-repeat ratios; clock 0 = wall, 1 = CPU time."""
    ratios = [a[clock] / b[clock] for a, b in zip(numerator, denominator)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def _median_ms(times: list[tuple]) -> str:
    return f"{statistics.median(t[0] for t in times) * 1e3:.0f}"


def table(rows: list[dict]) -> str:
    session = any("session update" in row["times"] for row in rows)
    decomposed = any("hard pullback" in row["times"] for row in rows)
    header = ("| device | model | batch | gradient ms | pullback ms | "
              "r1 = pullback ÷ gradient, wall, median (range) | r1, CPU time | "
              "peak memory ÷ gradient's (whole / above model) | "
              "minor page faults per call, gradient / pullback (median) |")
    if session:
        header += (" session update ÷ fresh pullback | 5 targets batched ÷ update | "
                   "5 targets loop ÷ update |")
    if decomposed:
        header += (" gradient under a pass-through mode ÷ gradient | "
                   "gate='hard' pullback ÷ gradient | "
                   "one sigmoid pass over the gated pre-activations ÷ gradient |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        t, memory = row["times"], row.get("memory")
        memory_cell = "–" if memory is None else (
            f"{memory['pullback']['peak'] / memory['gradient']['peak']:.2f} / "
            f"{memory['pullback']['above_model'] / memory['gradient']['above_model']:.2f}")
        line = (f"| {row['device']} | {row['model']} | {row['batch']} | "
                f"{_median_ms(t['gradient'])} | {_median_ms(t['pullback'])} | "
                f"{_ratio_cell(t['pullback'], t['gradient'])} | "
                f"{_ratio_cell(t['pullback'], t['gradient'], clock=1)} | {memory_cell} | "
                f"{statistics.median(f for *_, f in t['gradient']):.0f} / "
                f"{statistics.median(f for *_, f in t['pullback']):.0f} |")
        if session:
            line += (f" {_ratio_cell(t['session update'], t['pullback'])} | "
                     f"{_ratio_cell(t['5 targets batched'], t['session update'])} | "
                     f"{_ratio_cell(t['5 targets loop'], t['session update'])} |")
        if decomposed:
            line += (f" {_ratio_cell(t['gradient under a mode'], t['gradient'])} | "
                     f"{_ratio_cell(t['hard pullback'], t['gradient'])} | "
                     f"{_ratio_cell(t['sigmoid pass'], t['gradient'])} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--session", action="store_true", help="add the session columns")
    parser.add_argument("--decompose", action="store_true",
                        help="add the floors: a gradient under a pass-through function mode, "
                             "the pullback with gate='hard' (the engine without soft math), "
                             "one sigmoid pass over the gated pre-activations")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--profile", action="store_true",
                        help="add, per model and batch, the ops that differ most in time")
    parser.add_argument("--keep-heap", action="store_true",
                        help="diagnostic: time with glibc keeping freed memory (no heap trims; "
                             "this process only, the memory probes keep the default)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "BATCH", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        _rss_probe(args.memory_probe[0], int(args.memory_probe[1]), args.memory_probe[2])
        return ""
    if args.keep_heap:
        keep_heap()
    rows, notes, profiles = [], [], []
    for name in args.models:
        model, weights = load(name, args.device)
        notes.append(f"{name}: {weights} weights")
        for batch in args.batches:
            row = {"device": args.device, "model": name, "batch": batch,
                   "times": measure(model, batch, args.repeats, args.device, args.session,
                                    args.decompose)}
            if not args.no_memory:
                row["memory"] = {method: peak_memory(name, batch, method, args.device)
                                 for method in ("gradient", "pullback")}
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.profile:
                profiles.append(f"Profile, {name}, batch {batch}:\n\n"
                                + profile_summary(model, batch, args.device))
    text = (table(rows) + f"\n\n{args.repeats} repeats; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; " + "; ".join(notes)
            + ("; timed with --keep-heap (no heap trims)" if args.keep_heap else "") + ".\n")
    text += "".join(f"\n{profile}\n" for profile in profiles)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
