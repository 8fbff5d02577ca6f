"""How fast is `pullback-widgets evaluate`, how does it scale, and does its memory stay flat?

    python benchmarks/evaluate_speed.py [--images 8] [--repeats 2]

EfficientNet-Lite0 at 224 px on CPU, one torch thread per process (OMP_NUM_THREADS=1):

- images per second for ``gradient`` and ``pullback`` on deletion + insertion (16 steps each,
  the predicted class), in one process and under ``torchrun --nproc-per-node 2``;
- the peak resident memory of the whole process tree for 8 and for 64 images (``random``
  on deletion, the cheapest method, so that the run is about streaming the images), sampled
  every 20 ms with psutil.

The images are flipped and cropped copies of the packaged sample photos, written as PNG.
Every figure is one run of the command as a user would start it (a fresh process, model
loading included), so read the ratios, and the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

import pullback_widgets as pw

ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int) -> None:
    """``count`` distinct images: each sample photo, mirrored or not, cropped by 0..12%."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [pw.images.sample_image_array(name) for name in pw.SAMPLE_IMAGES]
    for index in range(count):
        array = arrays[index % len(arrays)]
        variant = index // len(arrays)
        if variant % 2:
            array = array[:, ::-1]
        height, width = array.shape[:2]
        cut = variant * min(height, width) // 50
        crop = np.ascontiguousarray(array[cut:height - cut, cut:width - cut])
        Image.fromarray(crop).save(folder / f"image{index:04d}.png")


def run(args: list[str], processes: int, out: Path) -> dict[str, float]:
    """The command in a fresh process tree: wall time, the runner's own time, peak RSS."""
    for stale in out.parent.glob(out.stem + "*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, "-m", "pullback_widgets.cli", *args, "--out", str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(processes), "-m", "pullback_widgets.cli", *args,
                   "--out", str(out)]
    began = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = psutil.Popen(command, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read()[-2000:]}")
    record = json.loads(out.with_name(out.stem + ".settings.json").read_text())
    return {"wall": wall, "seconds": record["seconds"], "images": record["images"],
            "peak_mib": peak / 2**20, "cpu": cpu}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images for the speed runs")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "evaluate_speed.md")
    args = parser.parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir) / "images"
        write_images(folder, 64)
        out = Path(workdir) / "results.csv"
        common = ["evaluate", str(folder), "--metrics", "deletion", "insertion",
                  "--batch-size", "4", "--limit", str(args.images)]
        # Interleaved repeats, so that load from other jobs hits every configuration alike.
        speed: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for method in ("gradient", "pullback"):
                for processes in (1, 2):
                    result = run([*common, "--methods", method], processes, out)
                    speed.setdefault((method, processes), []).append(result)
                    print(method, processes, result, flush=True)
        memory = {}
        for count in (8, 64):
            memory[count] = run(["evaluate", str(folder), "--methods", "random", "--metrics",
                                 "deletion", "--batch-size", "8", "--limit", str(count)],
                                1, out)
            print(count, memory[count], flush=True)
    load = os.getloadavg()
    lines += [
        "# `pullback-widgets evaluate`: speed and memory on CPU",
        "",
        f"Generated by `python benchmarks/evaluate_speed.py --images {args.images} "
        f"--repeats {args.repeats}`. "
        f"EfficientNet-Lite0, 224 px, {platform.machine()} with {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS=1 per process, torch {torch.__version__}. **The machine was shared "
        "with other engineers' jobs while this ran** (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over 1 / 5 / 15 min at the end, on "
        f"{os.cpu_count()} cores): the absolute figures are pessimistic and noisy.",
        "",
        f"## Images per second ({args.images} images, deletion + insertion, 16 steps each, "
        "predicted class, --batch-size 4)",
        "",
        "`runner s`: the runner's own time (model loading included, Python start-up not), "
        f"each of {args.repeats} interleaved runs; images / s and the speed-up from the "
        "fastest run of each (the one least disturbed by other jobs); `wall s`: the whole "
        "command, fastest run. `CPU s`: user + system time of all the command's processes "
        "(fastest run), which the load of other jobs affects far less than the wall time: on "
        "a machine as loaded as this one, the scheduler gives each process its share, so two "
        "processes get more CPU than one and the wall-time speed-up can exceed 2. "
        "`CPU s per image` compares the work done; 1 → 2 processes scale well when it stays "
        "the same.",
        "",
        "| method | processes | runner s (each run) | images / s | wall s | CPU s | "
        "CPU s per image | speed-up (runner s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, processes), runs in speed.items():
        best = min(runs, key=lambda r: r["seconds"])
        single = min(r["seconds"] for r in speed[method, 1])
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        lines.append(f"| {method} | {processes} | {each} | "
                     f"{best['images'] / best['seconds']:.2f} | {best['wall']:.1f} | "
                     f"{best['cpu']:.1f} | {best['cpu'] / best['images']:.1f} | "
                     f"{single / best['seconds']:.2f}× |")
    lines += [
        "",
        "## Peak memory (`random` on deletion, --batch-size 8, one process)",
        "",
        "Resident memory of the process, sampled every 20 ms.",
        "",
        "| images | peak RSS (MiB) | runner s |",
        "|---|---|---|",
        *(f"| {count} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |"
          for count, r in memory.items()),
        "",
        f"From 8 to 64 images the peak moves by "
        f"{memory[64]['peak_mib'] - memory[8]['peak_mib']:+.0f} MiB "
        f"({100 * (memory[64]['peak_mib'] / memory[8]['peak_mib'] - 1):+.1f}%). Images are "
        "decoded one batch at a time and each batch's rows go to disk; holding all 64 decoded "
        "images would take 64 × 0.6 MiB = 38 MiB. Most of the peak is torch itself (importing "
        "the CUDA build of torch alone is about 700 MiB resident here). Longer runs were not "
        "measured.",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
