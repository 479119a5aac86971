"""Pick the C++ compiler AOTInductor builds the package's wrapper with.

Why: the wrapper .so carries its own instances of libstdc++ templates (std::regex,
locale facets) but runs against the libstdc++ already loaded in the process. Built
with a compiler whose libstdc++ differs from that one, it crashed while loading: on
the GPU machine (torch 2.11, CXX=/opt/gcc/bin/g++, GCC 13.3 with its own libstdc++)
every package segfaulted in `std::regex` inside `parse_device_str`, called from the
AOTInductorModel constructor (cuda-gdb backtrace; bench/aoti_probe.py reproduces it),
while the same package built with /usr/bin/g++ loaded and ran. So `pick_cxx` takes
$QWEN3_AOT_CXX when set, else the system g++ (it pairs with the system libstdc++ that Python
loads), and only without one the first compiler whose libstdc++ is the loaded one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def loaded_libstdcxx() -> Path | None:
    """The libstdc++ mapped into this process (torch loads it), resolved."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libstdc++.so" in path:
                return Path(path).resolve()
    except OSError:
        pass
    return None


def compiler_libstdcxx(cxx: str) -> Path | None:
    """The libstdc++ that `cxx` links against, resolved (its dev symlink, else the .so.6)."""
    for name in ("libstdc++.so", "libstdc++.so.6"):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out and Path(out).exists():
            return Path(out).resolve()
    return None


def pick_cxx() -> str:
    """$QWEN3_AOT_CXX if set; else the system g++ (it pairs with the system libstdc++ that
    Python loads); else the first compiler whose libstdc++ is the loaded one; else $CXX.

    Matching library files is not enough: on the GPU machine $CXX=/opt/gcc/bin/g++ reports
    the system libstdc++ yet its wrappers crashed (libstdc++ code ended up inside the .so)."""
    if os.environ.get("QWEN3_AOT_CXX"):
        return os.environ["QWEN3_AOT_CXX"]
    if Path("/usr/bin/g++").exists():
        return "/usr/bin/g++"
    candidates = [os.environ.get("CXX"), "/usr/bin/c++", "g++", "c++", "clang++"]
    found = [c for c in dict.fromkeys(candidates) if c and shutil.which(c)]
    loaded = loaded_libstdcxx()
    if loaded is not None:
        for cxx in found:
            if compiler_libstdcxx(cxx) == loaded:
                return shutil.which(cxx) or cxx
    return found[0] if found else "g++"
