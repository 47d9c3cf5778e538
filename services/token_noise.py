"""Randomness as a function of (seed, token position, stream): counter-based, not a running stream.

Every random number a generation uses is keyed by the seed, the index of the token it decides (in
prompt + generated text) and what it is for. Replaying a round after a resume, drafting ahead
(pipelining), batching sessions or changing K/N cannot shift anything: a position always sees the
same numbers. With Gumbel-max sampling (`sample`) a position's token is argmax(log p + g), so the
same seed gives the same text as the target sampling alone, whatever the draft proposed.

A key is hashed (BLAKE2b) into the seed of a fresh Mersenne-Twister generator on the CPU, so the
numbers are the same on every device and torch build with the same generator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

import torch


class Stream(IntEnum):
    """What a random number decides; streams are independent of each other."""

    SAMPLE = 0  # the target's token at a position (Gumbel-max); a coupled draft reads it too
    ACCEPT = 1  # rejection sampling: the accept test of the candidates at a position
    RESIDUAL = 2  # rejection sampling: the round's final draw (keyed by the round's first position)
    DRAFT = 3  # a draft's own samples, independent of everything the target draws


@dataclass(frozen=True)
class TokenNoise:
    seed: int

    def generator(self, position: int, stream: Stream) -> torch.Generator:
        key = f"{self.seed}:{position}:{int(stream)}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def uniform(self, position: int, stream: Stream, count: int) -> torch.Tensor:
        """`count` float64 uniforms in (0, 1) for this position and stream (a prefix-stable list)."""
        u = torch.rand(count, dtype=torch.float64, generator=self.generator(position, stream))
        return u.clamp_min(2.0**-60)

    def sample(self, probs: torch.Tensor, position: int, stream: Stream = Stream.SAMPLE) -> int:
        """One token from a probability vector by Gumbel-max, written as the exponential race
        argmax(p / E) with E = -log(u) ~ Exp(1) (the same argmax as log p + Gumbel, one log fewer):
        an exact sample, and a pure function of the key."""
        race = -self.uniform(position, stream, probs.shape[-1]).log()
        return int((probs.detach().to("cpu", torch.float64) / race).argmax())
