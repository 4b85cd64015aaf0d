"""Process memory policy for the daemons: model-sized buffers go back to the OS when freed."""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE = 4 * 2**20


def return_large_buffers(threshold: int = LARGE) -> bool:
    """Make every allocation of ``threshold`` bytes or more its own mapping, unmapped on free.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which tensors of
    a few to 32 MiB come from malloc arenas whose freed pages stay resident: the server's RSS
    grew by about a model per round until it settled at ~3.5 models above idle (bench/round.py,
    9.88 M-parameter MLP); with the threshold pinned it stays at ~2. Returns False where
    ``mallopt`` is unavailable (not glibc), changing nothing.

    Only the server uses it. Trainers must not: with the threshold pinned, every gradient and
    activation of 4 MiB or more is a fresh mapping each step, and its page faults cost a third of
    the training throughput (bench/trainer.py, the 9.88 M MLP: 0.82x a bare DDP loop with it,
    1.1x without).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
