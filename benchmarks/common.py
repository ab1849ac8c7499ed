"""Shared pieces of the benchmarks: interleaved timing, peak memory, encoder presets, JSON output.

Timing protocol (every benchmark): each contender runs once to warm up, then the contenders
take turns for ``repeats`` rounds, the order rotating by one each round, so that a change in
machine load (the machines are shared) hits all of them alike. Results are the median and the
minimum over the rounds.

Memory (``peak MiB``): on CPU, the growth of the process's peak resident set (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its resident set before the
call, taken after ``malloc_trim`` has handed freed heap back to the system, so it counts tensors,
temporaries and workspaces alike; on CUDA, ``torch.cuda.max_memory_allocated`` over the memory
allocated before the call.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

# Acoustic encoders of the training-cost and inference benchmarks (dicts for TOTCAKTConfig's
# `encoder_config`). LayerDrop is off in both: it skips layers at random, which only adds noise
# to step times. SpecAugment keeps its defaults (it is part of a training step).
ENCODERS = {
    # transformers' Wav2Vec2Config defaults: the wav2vec2-base architecture (12 x 768, 95 M
    # parameters with its 7-layer convolutional front-end on the raw waveform, 20 ms frames).
    "wav2vec2-base": dict(model_type="wav2vec2", layerdrop=0.0),
    # A 6 x 384 Wav2Vec2-BERT (conformer) encoder on 80-bin log-mel features with two 10 ms frames
    # stacked, i.e. the same 20 ms frame rate as wav2vec2 (so the transport problems have the
    # same size), without the convolutional front-end that makes raw-waveform training slow on CPU.
    "w2v2-bert-small": dict(
        model_type="wav2vec2-bert",
        hidden_size=384,
        output_hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        feature_projection_input_dim=160,
        layerdrop=0.0,
    ),
}
# A Mandarin character vocabulary the size of AISHELL-1's (about 4.2 k symbols, blank included).
CTC_VOCAB_SIZE = 4233


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakMemory:
    """Extra peak memory (MiB, in ``.mib``) of the code run inside the context; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current resident set
            self.start = _resident_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _resident_kib("VmHWM") * 1024
        self.mib = max(0, peak - self.start) / 2**20
        return False


class Timings(NamedTuple):
    """Per contender name: wall-clock seconds, process CPU seconds and peak MiB of each timed round,
    and the result of the last round."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    peak_mib: dict[str, list[float | None]]
    results: dict[str, Any]


def timed_call(call: Callable[[], Any], device: torch.device, measure_memory: bool = True):
    """Run ``call()`` once; return ``(wall seconds, process CPU seconds, peak MiB or None, result)``.

    The CPU time (all threads of this process) is what a CPU computation costs whatever else the
    machine runs; the wall time also counts waiting for a free core. It means nothing for CUDA work.
    """
    memory = PeakMemory(device) if measure_memory else contextlib.nullcontext()
    with memory:
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = call()
        synchronize(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return elapsed, cpu, memory.mib if measure_memory else None, result


def round_robin(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    setup: Callable[[str], None] | None = None,
    measure_memory: bool = True,
) -> Timings:
    """Time every call of ``calls`` (name -> zero-argument callable) with the interleaved protocol.

    ``setup(name)``, when given, runs before each call, outside the timers and the memory
    measurement. Returns the ``repeats`` timings of each call (see [`Timings`]).
    """
    names = list(calls)

    def run(name):
        if setup is not None:
            setup(name)
        return timed_call(calls[name], device, measure_memory)

    for name in names:  # warm-up
        run(name)
    timings = Timings({name: [] for name in names}, {name: [] for name in names}, {name: [] for name in names}, {})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, cpu, mib, timings.results[name] = run(name)
            timings.wall[name].append(elapsed)
            timings.cpu[name].append(cpu)
            timings.peak_mib[name].append(mib)
    return timings


def summary(times: list[float]) -> dict[str, Any]:
    """``median_s``, ``min_s`` and all ``times_s`` of a list of timings."""
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=list(times))


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """What the timings depend on besides the code: library versions and the machine."""
    return dict(
        device=device.type,
        threads=threads,
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        load_average=os.getloadavg()[0],
    )


def write_json(path: str, meta: dict[str, Any], results: Any) -> None:
    """Write ``{"meta": meta, "results": results}`` to ``path`` (parent folders are created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        json.dump(dict(meta=meta, results=results), out, indent=2, ensure_ascii=False)


def save_figure(figure, path: Path, dpi: int = 110) -> None:
    """Lay out a matplotlib figure, write it as ``path`` (folders made as needed) and close it."""
    from matplotlib import pyplot

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot.close(figure)
