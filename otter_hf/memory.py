"""Resident memory of this process, as Linux counts it (`/proc/self/status`), for the benchmarks' peak memory.

Loading a checkpoint peaks far above inference or training (the file is read and copied), so a measurement calls
`reset_peak_resident_bytes()` once the model is loaded and reads `peak_resident_bytes()` after the workload: the
peak of the model at work, weights, activations, cache and optimizer state included.
"""

import re


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB$", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: resident memory is measured on Linux only.")
    return int(match.group(1)) * 1024


def resident_bytes() -> int:
    """The resident set size now (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The highest resident set size since the process started or since `reset_peak_resident_bytes()` (VmHWM)."""
    return _status_bytes("VmHWM")


def reset_peak_resident_bytes() -> None:
    """Lower the peak resident set size to the current resident set size."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
