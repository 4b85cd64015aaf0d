"""Process helpers: descendants via /proc, staged termination, death signals."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first found by walking /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = text[text.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def wait_exit(pid: int) -> None:
    """Await the exit of any process (not only a child) through a pidfd: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        if alive(pid):  # a zombie child is dead for us even though its pidfd is not yet readable
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def terminate_tree(proc: asyncio.subprocess.Process, grace_s: float) -> int:
    """SIGTERM a process and all its descendants, SIGKILL what is left after ``grace_s``."""
    tree = descendants(proc.pid)
    if proc.returncode is None:
        signal_all([proc.pid], signal.SIGTERM)
    signal_all(tree, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
            await asyncio.gather(*(wait_exit(p) for p in tree))
    except TimeoutError:
        pass
    tree += descendants(proc.pid)
    signal_all([p for p in tree if alive(p)], signal.SIGKILL)
    if proc.returncode is None:
        signal_all([proc.pid], signal.SIGKILL)
    return await proc.wait()


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """In a child (preexec_fn): receive ``sig`` when the parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
    except OSError:
        pass
