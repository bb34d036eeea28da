"""What the numbers ran on: the machine, the software, the settings both systems share, and how
much CPU other processes took meanwhile."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import time

import llama_cpp

from bench.settings import Settings
from localbot.chat_model import ChatLlamaCpp


class CpuMeter:
    """How much CPU *other* processes used while the benchmark ran (a disturbance gauge)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(values) - values[3] - values[4]) / hz
        own = sum(
            getattr(resource.getrusage(who), attr)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for attr in ("ru_utime", "ru_stime")
        )
        return time.monotonic(), busy, own

    def others_share(self) -> float:
        """CPU used by other processes, as a fraction of all cores, since construction."""
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self.start
        cores = os.cpu_count() or 1
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(1e-9, (t1 - t0) * cores)

    def disturbance(self) -> str:
        """A line for the report's notes."""
        others = self.others_share()
        return f"  Other processes used {100 * others:.0f}% of the machine's CPU during the run" + (
            ": timings may be disturbed, rerun on a quiet machine." if others > 0.1 else "."
        )


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_setup(s: Settings, model: ChatLlamaCpp, raw_desc: str | None) -> list[str]:
    """The header lines of a report (loads the model)."""
    params = model.load().context_params
    size_mb = s.model.stat().st_size / 1e6
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    gpu = model.gpu_layers
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"machine:  {platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; "
        f"load average at start {load}",
        f"software: Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__},"
        f" langchain-core {importlib.metadata.version('langchain-core')}",
        f"model:    {s.model} ({size_mb:.0f} MB, architecture {model.gguf.architecture})",
        f"settings: n_ctx {s.ctx}, n_batch {min(s.batch, s.ctx)}, threads {params.n_threads} "
        f"(batch {params.n_threads_batch}), swa_full {bool(params.swa_full)} for both, "
        f"greedy (temperature 0), seed {s.seed}",
        f"GPU:      offload {'supported' if offload else 'not supported'} by this build; "
        f"{'all' if gpu < 0 else gpu} layers offloaded"
        f"{'' if offload or gpu == 0 else ' (requested, but this build runs on the CPU)'}",
        f"template: localbot {model.template.name!r}" + (f"; raw: {raw_desc}" if raw_desc else ""),
    ]
