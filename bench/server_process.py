"""`qwen3-aot serve` as bench/serve.py starts it, with what a variant changes and a probe of the GIL.

    python bench/server_process.py --probe probe.json [--without uvloop,httptools] [--switch-interval S] \
        -- serve ARTIFACT --port N ...

--without makes those modules unimportable, so uvicorn's "auto" loop and HTTP parser fall back
to asyncio and h11 (what a server without uvicorn[standard] runs). --switch-interval sets
sys.setswitchinterval (Python's default is 5 ms: a thread that wants the GIL back, such as the
engine's loop thread after a CUDA wait, can wait that long while another thread runs Python).
The probe is a thread that sleeps 1 ms and records how late it wakes: its lateness beyond the
OS's is the GIL wait every thread of the process sees, the engine's loop thread included. Each
SIGUSR1 appends the lateness percentiles since the one before to --probe as a JSON line (the
bench sends one before and one after each measured run).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

PROBE_SLEEP_S = 0.001


class GilProbe:
    def __init__(self) -> None:
        self.late_s: list[float] = []
        self._thread = threading.Thread(target=self._run, name="gil-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            t = time.perf_counter()
            time.sleep(PROBE_SLEEP_S)
            self.late_s.append(time.perf_counter() - t - PROBE_SLEEP_S)

    def take(self) -> dict:
        """The lateness since the last take."""
        late, self.late_s = sorted(self.late_s), []
        if not late:
            return {"samples": 0}
        at = {str(p): late[min(len(late) - 1, int(len(late) * p / 100))] * 1e3 for p in (50, 90, 99, 99.9)}
        return {"samples": len(late), "late_ms": at, "late_mean_ms": sum(late) / len(late) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", type=Path, required=True, help="where SIGUSR1 appends the GIL probe's figures")
    ap.add_argument("--without", default="", help="comma-separated modules to make unimportable")
    ap.add_argument("--switch-interval", type=float, default=None)
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the qwen3-aot command line")
    a = ap.parse_args()
    for name in filter(None, a.without.split(",")):
        sys.modules[name] = None  # an import of it raises ImportError
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    probe = GilProbe()

    def dump(sig: int, frame: object) -> None:
        with a.probe.open("a") as f:
            f.write(json.dumps(probe.take()) + "\n")

    signal.signal(signal.SIGUSR1, dump)
    from qwen3_aot import cli

    return cli.main(a.cli[1:] if a.cli[:1] == ["--"] else a.cli)


if __name__ == "__main__":
    sys.exit(main())
