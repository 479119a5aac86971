"""The AOTInductor loader unpacks a package into `$TMPDIR/aotinductor_XXXXXX` and removes it in
its destructor, which a killed process never runs: each load removes what dead processes left."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

EXTRACTION = re.compile(r"aotinductor_\w{6}")  # the loader's mkdtemp name for the unpacked package
STALE_AFTER_S = 600  # an extraction this old, mapped by no process, belonged to one that was killed


def remove_stale_extractions(temp_dirs: tuple[str, ...] | None = None, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove unpacked packages that killed processes left in the temp directories; returns them.

    An extraction is stale when it is older than `older_than_s` (one being unpacked right now
    is young) and no process maps a file inside it (a live loader has its .so mapped). Only
    this user's extractions are looked at: mkdtemp makes them 0700, so no other user's
    process (whose maps we cannot read) can be using one."""
    dirs = temp_dirs or tuple(dict.fromkeys([tempfile.gettempdir(), "/tmp"]))
    now = time.time()
    candidates = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if (EXTRACTION.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                        and e.stat().st_uid == os.getuid() and now - e.stat().st_mtime > older_than_s):
                    candidates.append(Path(e.path))
            except OSError:
                continue
    if not candidates:
        return []
    mapped = _mapped_paths()
    stale = [c for c in candidates if mapped is not None and not any(m.startswith(f"{c}/") for m in mapped)]
    for c in stale:
        shutil.rmtree(c, ignore_errors=True)
    return stale


def _mapped_paths() -> set[str] | None:
    """Every file path mapped by a process this user can see; None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").is_file():
        return None
    paths: set[str] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            text = (proc / pid / "maps").read_text()
        except OSError:  # gone, or another user's
            continue
        fields = (line.split(None, 5) for line in text.splitlines())  # address perms offset dev inode path
        paths.update(f[5] for f in fields if len(f) == 6)
    return paths
