"""Random-access permutations: `perm(i)` for any index without materialising the order.

A 4-round Feistel network on the smallest power-of-4 domain >= n, walked until it lands
in [0, n) (cycle walking keeps it a bijection on [0, n)). Keys are 64-bit integers
derived by `derive_key(seed, *names)`, so every order in the data layer is a pure
function of (seed, names, index). Vectorised numpy; O(1) memory for any n.
"""

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_key(seed: int, *names) -> int:
    """A 64-bit key from a seed and names (a stage, a purpose, an epoch)."""
    text = ":".join([str(int(seed))] + [str(n) for n in names])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def permute(index, n: int, key) -> np.ndarray:
    """The image of `index` (array, values in [0, n)) under the permutation named `key`.

    `key` is an int or a uint64 array broadcastable with `index` (one key per element,
    used for per-epoch permutations)."""
    idx = np.asarray(index, dtype=np.int64)
    if n <= 0:
        raise ValueError(f"permutation size must be positive, got {n}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"index out of range [0, {n})")
    if n == 1:
        return np.zeros_like(idx)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.broadcast_to(np.asarray(key, dtype=np.uint64), idx.shape).copy()
    x = idx.astype(np.uint64)
    todo = np.ones(idx.shape, dtype=bool)
    with np.errstate(over="ignore"):
        while True:
            left, right = x >> np.uint64(half), x & mask
            for r in range(4):
                f = _mix(right ^ _mix(keys + np.uint64(r + 1))) & mask
                left, right = right, left ^ f
            y = (left << np.uint64(half)) | right
            x = np.where(todo, y, x)
            todo = x >= np.uint64(n)
            if not todo.any():
                break
    return x.astype(np.int64)


def epoch_permute(rank, n: int, base_key: int) -> np.ndarray:
    """Rank j of an endless stream of epochs over [0, n): epoch j // n uses its own
    permutation (key derived from base_key and the epoch), so each epoch is a new order."""
    rank = np.asarray(rank, dtype=np.int64)
    epoch = rank // n
    keys = _mix(np.uint64(base_key) ^ (epoch.astype(np.uint64) * _M2 + np.uint64(1)))
    return permute(rank % n, n, keys)
