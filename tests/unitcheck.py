"""Checks on generated units with systemd's own tools (no PID 1 needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def instances(directory: Path, name: str, ids: tuple[int, ...] = (0,)) -> list[str]:
    """Copy the templates of ``name`` to instance files (verify checks instances, not templates)."""
    files = []
    templates = [*directory.glob(f"{name}@.*"), *directory.glob(f"{name}-backoff@.*")]
    for template in sorted(templates):
        for i in ids:
            instance = directory / template.name.replace("@.", f"@{i}.")
            shutil.copy(template, instance)
            files.append(instance.name)
    return files


def verify(directory: Path, name: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on every unit of cluster ``name``, instances included."""
    suffixes = (".socket", ".service", ".target", ".mount")
    units = [p.name for p in directory.iterdir() if p.suffix in suffixes]
    units = [u for u in units if "@." not in u] + instances(directory, name)
    return subprocess.run(
        ["systemd-analyze", "verify", *sorted(set(units))],
        cwd=directory,
        capture_output=True,
        text=True,
    )


def exposure(directory: Path, name: str) -> tuple[int, str]:
    """(exit status with --threshold=20, the overall line) of systemd-analyze security."""
    instances(directory, name)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", f"{name}@0.service"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    overall = next(
        (line for line in result.stdout.splitlines() if "Overall exposure" in line), result.stderr
    )
    return result.returncode, overall
