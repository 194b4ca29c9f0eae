"""CPU time of processes, from /proc (stdlib only: the langgraph bench's own environment
imports it too)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds_tree(pid: int) -> float:
    """User plus system CPU time of a process and all its descendants, from /proc.

    Reaped children count too (through the waiting parent's cutime and cstime).
    """
    parents: dict[int, int] = {}
    spent: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        spent[child] = sum(int(value) for value in fields[11:15]) / tick
    tree = {pid}
    grown = True
    while grown:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return sum(spent.get(member, 0.0) for member in tree)
