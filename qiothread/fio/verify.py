"""Block contents that can be checked later, with fio's verify meanings.

fio's ``verify=`` (HOWTO, "Verification") writes blocks whose contents
can be checked when read back, and reports a mismatch with the offset.
qiothread keeps the meanings and uses its own block layout:

- ``md5``, ``crc32c``, ``crc32``: every block starts with a 64-byte
  header -- magic, method, block length, the offset the block was
  written at, the job's seed, a write generation (how many times this
  job wrote that block) and the digest of the body -- followed by a
  body derived from offset, seed and generation.  A read checks the
  magic, that the header's offset is where the block was read from (a
  misdirected write shows up here), the digest of the body, and, for
  blocks this job wrote, the seed and the generation it expects (a lost
  write shows up here).  Blocks written by an earlier run with the same
  method check on their own: the header describes them;
- ``pattern``: no header.  With ``verify_pattern`` the whole block is
  that pattern repeated; without it the block is the body derived from
  offset and seed only (no generation: a pattern block means the same
  thing whenever it was written), compared byte for byte.

The digests come from well-kept implementations: ``hashlib.md5``,
``zlib.crc32`` and Google's CRC32C (``google_crc32c``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib

import google_crc32c
import numpy as np

from qiothread.fio.options import Ddir, JobOptions, VerifyKind

__all__ = ["HEADER_SIZE", "BlockVerifier", "VerifyResult", "body_bytes"]

#: ``"qiov"`` little-endian: marks a qiothread verify header.
_MAGIC = 0x766F6971
#: magic, method, header length, block length, generation, offset,
#: seed, digest (16 bytes, zero-padded), header CRC32
_HEADER = struct.Struct("<IHHIIQQ16sI")
HEADER_SIZE = 64
_METHOD_ID = {VerifyKind.MD5: 1, VerifyKind.CRC32C: 2, VerifyKind.CRC32: 3}
_MAX_ERRORS_KEPT = 10
# Odd 64-bit constants (golden ratio, splitmix64) spread the inputs.
_K_STEP = np.uint64(0x9E3779B97F4A7C15)
_K_SEED = 0xBF58476D1CE4E5B9
_K_GEN = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _digest(kind: VerifyKind, body: bytes | memoryview) -> bytes:
    if kind is VerifyKind.MD5:
        return hashlib.md5(body).digest()
    if kind is VerifyKind.CRC32C:
        crc: int = google_crc32c.value(bytes(body))
        return crc.to_bytes(4, "little")
    return zlib.crc32(body).to_bytes(4, "little")


def body_bytes(offset: int, seed: int, generation: int,
               length: int) -> bytes:
    """The deterministic body for a block: 64-bit words that differ by
    position, offset, seed and generation."""
    base = (offset ^ (seed * _K_SEED) ^ (generation * _K_GEN)) & _MASK64
    words = np.arange((length + 7) // 8, dtype=np.uint64) * _K_STEP
    words += np.uint64(base)
    return words.tobytes()[:length]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking one block."""

    ok: bool
    reason: str = ""  #: what differed, for the report


class BlockVerifier:
    """Makes and checks block contents for one job (one owner).

    It remembers which generation of each block this job wrote last, so
    that a later read can tell a stale block from a current one.
    """

    def __init__(self, job: JobOptions) -> None:
        self.kind = job.verify
        self.seed = job.randseed
        self.pattern = job.verify_pattern
        self.job_writes = Ddir.WRITE in job.rw.directions
        #: offset -> (generation, length) of this job's last write
        self.written: dict[int, tuple[int, int]] = {}
        self.checked = 0
        self.mismatches = 0
        self.errors: list[str] = []

    @property
    def uses_header(self) -> bool:
        """Whether blocks carry the self-describing header."""
        return self.kind in _METHOD_ID

    def make_block(self, offset: int, length: int) -> bytes:
        """The contents of the next write of ``length`` bytes at
        ``offset``; records it as written."""
        generation = self.written.get(offset, (0, 0))[0] + 1
        self.written[offset] = (generation, length)
        return self.expected(offset, length, generation)

    def forget(self, offset: int, length: int) -> None:
        """Blocks in ``[offset, offset + length)`` were trimmed: their
        contents are no longer this job's to check."""
        for start in [o for o, (_, n) in self.written.items()
                      if o < offset + length and offset < o + n]:
            del self.written[start]

    def expected(self, offset: int, length: int, generation: int) -> bytes:
        """The contents a block has after write ``generation``."""
        if self.kind is VerifyKind.PATTERN:
            if self.pattern:
                reps = -(-length // len(self.pattern))
                return (self.pattern * reps)[:length]
            return body_bytes(offset, self.seed, 0, length)
        if length < HEADER_SIZE + 8:
            raise ValueError(f"block of {length} bytes is too small for a "
                             "verify header")
        body = body_bytes(offset, self.seed, generation,
                          length - HEADER_SIZE)
        header = _HEADER.pack(_MAGIC, _METHOD_ID[self.kind], HEADER_SIZE,
                              length, generation, offset, self.seed,
                              _digest(self.kind, body).ljust(16, b"\0"), 0)
        crc = zlib.crc32(header[:-4])
        header = header[:-4] + crc.to_bytes(4, "little")
        return header.ljust(HEADER_SIZE, b"\0") + body

    def should_check(self, offset: int) -> bool:
        """Whether a read at ``offset`` is checked.  As in fio, a job
        that writes checks only blocks it has written; a read-only job
        checks every block (written earlier with the same settings)."""
        return not self.job_writes or offset in self.written

    def check(self, offset: int, data: bytes | memoryview) -> VerifyResult:
        """Check a block read at ``offset``; counts the outcome."""
        self.checked += 1
        result = self._check(offset, bytes(data))
        if not result.ok:
            self.mismatches += 1
            if len(self.errors) < _MAX_ERRORS_KEPT:
                self.errors.append(result.reason)
        return result

    def _check(self, offset: int, data: bytes) -> VerifyResult:
        length = len(data)
        if not self.uses_header:
            want = self.expected(offset, length, 0)
            if data == want:
                return VerifyResult(True)
            first = next(i for i in range(length) if data[i] != want[i])
            return VerifyResult(False, f"verify: pattern mismatch at "
                                f"offset {offset}, byte {first}")
        (magic, method, hdr_len, blk_len, gen, hdr_off, seed, digest,
         crc) = _HEADER.unpack_from(data)
        where = f"verify: block at offset {offset}"
        if magic != _MAGIC or hdr_len != HEADER_SIZE:
            return VerifyResult(False, f"{where}: bad header magic "
                                f"0x{magic:08x}")
        if zlib.crc32(data[:_HEADER.size - 4]) != crc:
            return VerifyResult(False, f"{where}: header checksum wrong")
        if method != _METHOD_ID[self.kind]:
            return VerifyResult(False, f"{where}: written with another "
                                "verify method")
        if hdr_off != offset or blk_len != length:
            return VerifyResult(False, f"{where}: holds the block of "
                                f"offset {hdr_off} length {blk_len}")
        mine = self.written.get(offset)
        if mine is not None and (gen != mine[0] or seed != self.seed):
            return VerifyResult(False, f"{where}: stale data (generation "
                                f"{gen}, expected {mine[0]})")
        got = _digest(self.kind, data[HEADER_SIZE:]).ljust(16, b"\0")
        if got != digest:
            return VerifyResult(False, f"{where}: {self.kind.value} "
                                f"mismatch (wanted {digest.hex()}, got "
                                f"{got.hex()})")
        return VerifyResult(True)
