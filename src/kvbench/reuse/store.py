"""Where cached blocks live: a RAM tier with a byte budget, and an optional disk tier.

Writes go to every tier (write-through), so a block evicted from RAM is still a disk hit, and a
restarted process keeps its disk hits. Reads try RAM first; a disk hit is promoted to RAM.

Disk entries are one file per block, named by chain key, inside a directory per namespace. A file is
written to a temporary name and renamed into place (atomic on POSIX), so concurrent processes sharing
a directory never see a half-written block (the last rename of a key wins; both writers computed the
block's K/V from the same tokens). Each file carries a checksum of all its bytes and its own key: a
corrupt, truncated or misnamed entry is a miss, is removed and logged, never a crash or a wrong answer.
Anything under a block's name that is not a regular file (a directory, a link) is logged and left alone,
and a directory deleted while a process runs turns its writes into logged failures to store.
Budgets are per process: processes sharing a directory each keep theirs, and a block another process
evicted is a plain miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
import torch

from kvbench.errors import KvbenchError
from kvbench.reuse.blocks import Namespace, fingerprint

log = logging.getLogger("kvbench.reuse")

POLICIES = ("lru", "lfu")
_MAGIC = b"KVB1"
_SUFFIX = ".kvb"


@dataclass
class Block:
    """K/V of one block for every layer: `kv` is [layers, 2 (key, value), kv_heads, block_size, head_dim].

    `position` is where the block's first token sat when it was computed (its keys carry that
    rotation); `tokens` are its token ids, so a content match can be confirmed and re-indexed; `parent`
    is the chain key of the block before it where the writer recorded it (the serving engine's spill
    does, so a hit is confirmed against its parent as the pool confirms its own).
    """

    kv: torch.Tensor
    position: int
    tokens: tuple[int, ...]
    content: str
    parent: str | None = None

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0
    bytes: int = 0
    blocks: int = 0


@dataclass
class _Int8:
    """A block's K/V quantized per (layer, k/v, head, token) over head_dim: int8 codes, fp16 scale and offset."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def pack(cls, kv: torch.Tensor) -> _Int8:
        low, high = kv.amin(-1, keepdim=True).float(), kv.amax(-1, keepdim=True).float()
        scale = ((high - low) / 255).clamp(min=1e-8)
        codes = ((kv.float() - low) / scale).round().clamp(0, 255).sub(128).to(torch.int8)
        return cls(codes, scale.half(), low.half(), kv.dtype)

    def unpack(self) -> torch.Tensor:
        return ((self.codes.float() + 128) * self.scale.float() + self.offset.float()).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))


class RamTier:
    """Blocks in host memory under a byte budget. `lru` evicts the least recently used block; `lfu`
    the least frequently used (ties: least recent). With `int8`, blocks are stored quantized (lossy:
    hits are then approximate)."""

    def __init__(self, budget_bytes: int, policy: str = "lru", int8: bool = False):
        if policy not in POLICIES:
            raise KvbenchError(f"unknown eviction policy {policy!r}; valid: {', '.join(POLICIES)}")
        if budget_bytes <= 0:
            raise KvbenchError(f"the RAM tier's budget must be > 0 bytes, got {budget_bytes}")
        self.budget, self.policy, self.int8 = budget_bytes, policy, int8
        self.entries: OrderedDict[str, tuple[Block, _Int8 | None]] = OrderedDict()
        self.uses: dict[str, int] = {}
        self.stats = TierStats()

    def _size(self, block: Block, packed: _Int8 | None) -> int:
        return packed.nbytes if packed is not None else block.nbytes

    def get(self, key: str) -> Block | None:
        entry = self.entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.entries.move_to_end(key)
        self.uses[key] += 1
        self.stats.hits += 1
        block, packed = entry
        if packed is None:
            return block
        return dataclasses.replace(block, kv=packed.unpack())

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def put(self, key: str, block: Block) -> None:
        if key in self.entries:
            return
        packed = _Int8.pack(block.kv) if self.int8 else None
        size = self._size(block, packed)
        if size > self.budget:
            raise KvbenchError(
                f"one block needs {size} bytes but the RAM tier's budget is {self.budget}; "
                "raise the budget or lower block_size"
            )
        while self.stats.bytes + size > self.budget:
            self._evict()
        stored = dataclasses.replace(block, kv=torch.empty(0)) if packed is not None else block
        self.entries[key] = (stored, packed)
        self.uses[key] = 0
        self.stats.bytes += size
        self.stats.blocks += 1

    def _evict(self) -> None:
        if self.policy == "lru":
            victim = next(iter(self.entries))
        else:  # least used; OrderedDict order (oldest use first) breaks ties by recency
            victim = min(self.entries, key=self.uses.__getitem__)
        block, packed = self.entries.pop(victim)
        del self.uses[victim]
        self.stats.bytes -= self._size(block, packed)
        self.stats.blocks -= 1
        self.stats.evictions += 1

    def keys(self):
        return list(self.entries)


class DiskTier:
    """One checksummed file per block under `root/<namespace>/`; the index is rebuilt from the files.

    A file is MAGIC, a JSON header (its own key, position, tokens, dtype, shape), the K/V bytes, and a
    blake2b digest of all of that: a flipped bit anywhere, a truncation, or a file under another key's
    name is caught on read. Pages are dropped from the OS page cache after every write and read, so a
    disk hit is measured as a read from the device, not from memory.
    """

    STALE_TEMP_S = 3600  # temporary files older than this were left by a killed writer

    def __init__(self, root: str | os.PathLike, ns: Namespace, budget_bytes: int | None = None):
        self.dir = Path(root) / ns.name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.dir, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(13, "not readable and writable")
            probe = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe-", delete=True)
            probe.close()
        except OSError as exc:
            raise KvbenchError(
                f"cannot use {root} as the disk tier: {exc.strerror or exc}; choose a readable, writable directory"
            ) from None
        if budget_bytes is not None and budget_bytes <= 0:
            raise KvbenchError(f"the disk tier's budget must be > 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.stats = TierStats()
        self.meta: OrderedDict[str, tuple[int, tuple[int, ...], str, int]] = OrderedDict()  # key -> position, tokens, content, size
        self._rebuild()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}{_SUFFIX}"

    def _rebuild(self) -> None:
        now, found = time.time(), []
        for path in self.dir.iterdir():
            try:
                stat = path.lstat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if not S_ISREG(stat.st_mode):  # a directory or a link named like a block is not ours to read or remove
                if path.suffix == _SUFFIX:
                    log.warning("kvbench reuse: ignoring %s in the disk tier: not a regular file", path)
                continue
            if path.name.startswith(".tmp-") and now - stat.st_mtime > self.STALE_TEMP_S:
                path.unlink(missing_ok=True)
            elif path.suffix == _SUFFIX:
                found.append((stat.st_mtime, path, stat.st_size))
        for _, path, size in sorted(found):
            try:
                with open(path, "rb") as f:
                    header = _header(f.read(8 + _MAX_HEADER), path.stem)
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - any unreadable entry is a removed miss, never a crash
                self._drop(path.stem, f"unreadable header ({exc})")
                continue
            self.meta[path.stem] = (header["position"], tuple(header["tokens"]), header["content"], size)
            self.stats.bytes += size
            self.stats.blocks += 1

    def _forget(self, key: str) -> None:
        entry = self.meta.pop(key, None)
        if entry is not None:
            self.stats.bytes -= entry[3]
            self.stats.blocks -= 1

    def _drop(self, key: str, why: str) -> None:
        log.warning("kvbench reuse: removing corrupt disk block %s: %s", key, why)
        self.stats.corrupt += 1
        self._forget(key)
        self._path(key).unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    def keys(self):
        return list(self.meta)

    def get(self, key: str) -> Block | None:
        if key not in self.meta:
            self.stats.misses += 1
            return None
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
                _drop_page_cache(f.fileno())
            header, kv = _parse(data, key)
        except FileNotFoundError:  # evicted by another process sharing the directory: a plain miss
            self._forget(key)
            self.stats.misses += 1
            return None
        except Exception as exc:  # noqa: BLE001 - corrupt in any way: a removed, logged miss
            self._drop(key, str(exc) or type(exc).__name__)
            self.stats.misses += 1
            return None
        self.meta.move_to_end(key)
        self.stats.hits += 1
        return Block(kv, header["position"], tuple(header["tokens"]), header["content"], header.get("parent"))

    def put(self, key: str, block: Block) -> None:
        if key in self.meta:
            return
        data = _serialize(key, block)
        if self.budget is not None:
            while self.meta and self.stats.bytes + len(data) > self.budget:
                self._evict()
        tmp = None
        try:  # the directory itself may be gone (a user clearing the cache): a failed write, not a crash
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=f"-{os.getpid()}")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                _drop_page_cache(f.fileno())
            os.replace(tmp, self._path(key))
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise KvbenchError(f"cannot write to the disk tier {self.dir}: {exc.strerror or exc}") from None
        self.meta[key] = (block.position, block.tokens, block.content, len(data))
        self.stats.bytes += len(data)
        self.stats.blocks += 1

    def _evict(self) -> None:
        key, entry = self.meta.popitem(last=False)
        self._path(key).unlink(missing_ok=True)
        self.stats.bytes -= entry[3]
        self.stats.blocks -= 1
        self.stats.evictions += 1


_MAX_HEADER = 1 << 16
_DIGEST_BYTES = 16


def _drop_page_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _serialize(key: str, block: Block) -> bytes:
    kv = block.kv.detach().cpu().contiguous()
    raw = kv.view(torch.int16) if kv.dtype in (torch.bfloat16, torch.float16) else kv
    array = raw.numpy()
    header = json.dumps({
        "key": key, "position": block.position, "tokens": list(block.tokens), "content": block.content,
        "parent": block.parent,
        "dtype": str(kv.dtype).removeprefix("torch."), "numpy_dtype": array.dtype.str, "shape": list(array.shape),
    }).encode()
    body = _MAGIC + struct.pack("<I", len(header)) + header + array.tobytes()
    return body + hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest()


def _header(data: bytes, key: str) -> dict:
    """The header of an entry named `key`, checked for shape (not for the payload's digest)."""
    if data[:4] != _MAGIC or len(data) < 8:
        raise ValueError("bad magic")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + length])
    if header.get("key") != key:
        raise ValueError(f"entry holds key {header.get('key')!r}")
    if not (isinstance(header["position"], int) and isinstance(header["content"], str)
            and all(isinstance(t, int) for t in header["tokens"])):
        raise ValueError("malformed header")
    return header


def _parse(data: bytes, key: str) -> tuple[dict, torch.Tensor]:
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest() != digest:
        raise ValueError("checksum mismatch")
    header = _header(body, key)
    (length,) = struct.unpack("<I", body[4:8])
    array = np.frombuffer(body[8 + length:], dtype=np.dtype(header["numpy_dtype"])).reshape(header["shape"])
    return header, torch.from_numpy(array.copy()).view(getattr(torch, header["dtype"]))


@dataclass
class TieredStore:
    """RAM then disk, written through; a content index finds blocks by their tokens alone."""

    ram: RamTier
    disk: DiskTier | None = None
    by_content: dict[str, str] = field(default_factory=dict)  # content key -> chain key
    by_fingerprint: dict[int, list[str]] = field(default_factory=dict)  # rolling fingerprint -> content keys

    def __post_init__(self):
        if self.disk is not None:
            for key, (_, tokens, content, _) in self.disk.meta.items():
                self._index(key, tokens, content)

    def _index(self, key: str, tokens: tuple[int, ...], content: str) -> None:
        if content not in self.by_content:
            self.by_content[content] = key
            contents = self.by_fingerprint.setdefault(fingerprint(tokens), [])
            if content not in contents:  # re-stored after its block was forgotten
                contents.append(content)

    def __contains__(self, key: str) -> bool:
        return key in self.ram or (self.disk is not None and key in self.disk)

    def get(self, key: str) -> tuple[Block, str] | None:
        """The block and the tier it came from ('ram' or 'disk'), or None."""
        block = self.ram.get(key)
        if block is not None:
            return block, "ram"
        if self.disk is not None:
            block = self.disk.get(key)
            if block is not None:
                self.ram.put(key, block)
                return block, "disk"
        return None

    def put(self, key: str, block: Block) -> None:
        self.ram.put(key, block)
        if self.disk is not None:
            self.disk.put(key, block)
        self._index(key, block.tokens, block.content)

    def forget_missing(self, content: str) -> None:
        """Drop a content entry whose block is gone from every tier."""
        key = self.by_content.get(content)
        if key is not None and key not in self:
            del self.by_content[content]

    def stats(self) -> dict:
        tiers = {"ram": self.ram.stats}
        if self.disk is not None:
            tiers["disk"] = self.disk.stats
        return {name: dict(vars(s)) for name, s in tiers.items()}
