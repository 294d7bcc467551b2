"""The unload's random streams, defined here in plain torch; the Triton kernels and csrc/ compute the same bits.

Two streams, both Philox4x32-10 (Triton's ``tl.philox`` constants) keyed by a 64-bit seed, with the element's
logical position as the counter, so the same seed gives the same numbers whatever the tiling, the backend or a
row shard:

- stochastic rounding of W[i, j]: 16 bits, half ``j % 2`` of word ``(j % 8) // 2`` of Philox(counter (j // 8, i)).
  One Philox call serves 8 elements (a 16-byte vector of a 16-bit W).
- a fresh lora_A[k, j]: 24 bits, the top of word ``j % 4`` of Philox(counter (j // 4, k)), mapped to the odd
  multiple of 2**-24 ``z = (2 * bits + 1 - 2**24) * 2**-24`` in (-1, 1) (exact in fp32, symmetric about 0), then
  ``A = z * bound`` with bound = 1/sqrt(in) (kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT).

Seeds are computed on the host, never on the device: from an int (``seed_for``; the unload driver passes a pure
function of (seed, unload index, layer)), or drawn from a generator without a device sync (``draw_seed``).
"""
from __future__ import annotations

import torch

PHILOX_ROUNDS = 10
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """A 64-bit mix (Steele et al.): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def seed_for(base: int, *path: int) -> int:
    """A seed as a pure function of ``base`` and a path such as (unload index, layer index, stream)."""
    s = splitmix64(int(base) & _U64)
    for p in path:
        s = splitmix64(s ^ (int(p) & _U64))
    return s & 0x7FFFFFFFFFFFFFFF  # an int64 the kernels take as it is


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed from ``generator`` (None: torch's default CPU generator), consuming it, on the host.

    A CPU generator draws one int64. A CUDA generator is never read on the device (that is a sync): its state is
    (initial seed, Philox offset) held on the host, so the seed is a function of both and the offset advances.
    """
    if generator is None or generator.device.type == "cpu":
        return int(torch.randint(0, 2**63 - 1, (), generator=generator)) & 0x7FFFFFFFFFFFFFFF
    offset = generator.get_offset()
    generator.set_offset(offset + 4)  # Philox offsets count 4-word blocks
    return seed_for(generator.initial_seed(), offset)


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * x for 32-bit m and x held in int64, without overflowing int64."""
    lo16, hi16 = x & 0xFFFF, x >> 16
    p_lo, p_hi = m * lo16, m * hi16  # each < 2**48
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor) -> list[torch.Tensor]:
    """Philox4x32-10 with key ``seed`` (64 bits) and counters (c0, c1, 0, 0): four int64 tensors of 32-bit words."""
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64) & _U32, c1.to(torch.int64) & _U32)
    c = [c0, c1, torch.zeros_like(c0), torch.zeros_like(c0)]
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(_M0, c[0])
        hi1, lo1 = _mulhilo(_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return c


def rounding_bits(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 16 random bits (int64 in [0, 2**16)) of W[rows[:, None], cols[None, :]] for stochastic rounding."""
    words = philox(seed, (cols // 8)[None, :], rows[:, None])
    j = cols[None, :] % 8
    word = torch.where(j < 2, words[0], torch.where(j < 4, words[1], torch.where(j < 6, words[2], words[3])))
    return (word >> (16 * (j % 2))) & 0xFFFF


def init_values(seed: int, rows: int, cols: int, bound: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A fresh lora_A (rows x cols) in ``dtype``: bound * z with z the stream's odd multiples of 2**-24."""
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    words = philox(seed, (c // 4)[None, :], r[:, None])
    j = c[None, :] % 4
    word = torch.where(j < 1, words[0], torch.where(j < 2, words[1], torch.where(j < 3, words[2], words[3])))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    z = ((word >> 8) * 2 + 1 - 2**24).to(compute) * 2.0**-24
    return (z * torch.tensor(bound, dtype=compute)).to(dtype)


def init_bound(in_features: int) -> float:
    """kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT."""
    return 1.0 / in_features**0.5 if in_features else 0.0


# ------------------------------------------------------------------------------------------ LoRA dropout
# x[i, j] is kept with probability 1 - p: the top 24 bits of word j % 4 of Philox(seed, counter (j // 4, i)) are
# below keep_threshold(p). The mask is never stored: the forward's x A^T, the backward's dA and the low-rank
# term of dx each regenerate it from the seed (the Triton kernels in the tile they load).

def keep_threshold(p: float) -> int:
    """The integer below which a 24-bit draw keeps an element: round((1 - p) 2**24)."""
    return int(round((1.0 - p) * 2**24))


def dropout_keep(seed: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask (bool) of x[rows[:, None], cols[None, :]] for dropout probability ``p``."""
    words = philox(seed, (cols // 4)[None, :], rows[:, None])
    j = cols[None, :] % 4
    word = torch.where(j < 1, words[0], torch.where(j < 2, words[1], torch.where(j < 3, words[2], words[3])))
    return (word >> 8) < keep_threshold(p)
