"""Ways to damage an artifact that its checks must catch, shared by the build and runtime tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from qwen3_aot import manifest


def flip_byte(f: Path, at: int = -10) -> None:
    """Damage one byte, keeping the size."""
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def edit_manifest(artifact: Path, fn: Callable[[dict], object]) -> None:
    """Change the manifest in place (`fn` edits the parsed JSON), its checksums left as they were."""
    man = json.loads((artifact / "manifest.json").read_text())
    fn(man)
    (artifact / "manifest.json").write_text(json.dumps(man))


def rewrite_with_checksums(artifact: Path, name: str, data: bytes) -> None:
    """Replace a file and update the manifest's checksums and sizes: damage they cannot catch."""
    (artifact / name).write_bytes(data)
    man = json.loads((artifact / "manifest.json").read_text())
    manifest.write(artifact, {k: v for k, v in man.items() if k not in ("files", "sizes")})
