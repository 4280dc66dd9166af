"""What a benchmark ran on, and the peak memory of one phase of it.

Every figure in docs/benchmarks.md names its machine, so each results file carries this description
(CPU model, cores, memory, torch, device, and the load average around the run: the reference machine's
2 cores are often shared, and a load above the core count means the figures are upper bounds).
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from types import TracebackType
from typing import Any

import torch


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def describe(device: torch.device) -> dict[str, Any]:
    """The machine and software a run measured, as JSON-ready values."""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def status_kib(field: str) -> int | None:
    value = _proc_field("/proc/self/status", field)
    return int(value.split()[0]) if value else None


def reset_rss_peak() -> bool:
    """Resets the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as peak:``, in MiB (``peak.result``).

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's reserve).
    On the CPU: the main process's resident set, high-water mark minus the RSS at entry. Neither
    tracemalloc (Python's allocator only) nor torch's CPU allocator sees everything oneDNN and the
    BLAS allocate, the RSS does. DataLoader workers are other processes and are not included.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict[str, Any] = {}
        self._before = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif reset_rss_peak() and (rss := status_kib("VmRSS")) is not None:
            self._before = rss * 1024
            self._source = "VmHWM - VmRSS at start (main process)"
        else:  # not resettable: the process's lifetime peak, an upper bound for the phase
            self._before = 0
            self._source = "ru_maxrss (process lifetime peak, main process)"
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, source = torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
            self.result = {"peak_mib": round(peak / 2**20, 1), "increase_mib": round((peak - self._before) / 2**20, 1),
                           "source": source}
            return
        hwm = status_kib("VmHWM") if self._before else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result = {"peak_mib": round(peak / 2**20, 1),
                       "increase_mib": round((peak - self._before) / 2**20, 1) if self._before else None,
                       "source": self._source}
