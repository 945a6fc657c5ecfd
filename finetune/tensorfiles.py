"""Writing tensor files: PyTorch `.pth` (torch.save's zip format) and safetensors, tensor by tensor.

Why not `torch.save` / `safetensors.torch.save_file`: they need every tensor in memory at once (a merge streams a
14B model through one buffer), their write failures are not OS errors (`torch.save` on a full disk raises
"basic_ios::clear: iostream error"; safetensors a `SafetensorError`), and `torch.save` names the zip's internal
folder after the file it writes to, which under an atomic write is the temporary name.

The `.pth` writer produces what `torch.save({name: tensor})` does: a zip (stored, not compressed) holding
`STEM/data.pkl` (a protocol-2 pickle of {name: _rebuild_tensor_v2(storage, ...)} with storages as persistent ids),
`STEM/data/N` (each tensor's bytes, aligned to 64 bytes like torch's writer), and torch's small records (format
version, byte order, ...) copied from a tiny `torch.save` so they follow the installed torch. STEM is the final file's
stem, as `torch.save` names it. Python's zipfile computes the CRC-32 of every record (`unzip -t` and
`zipfile.testzip()` pass) and raises OSError (ENOSPC, EFBIG, ...) on any failed write; the file is fsync'ed.

Both writers take a plan `[(name, shape, dtype)]` and `produce(name, slot) -> tensor`; the next tensor is computed
while the previous one is written (`pipelined`). Callers write into a temporary from `finetune.atomic`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import math
import os
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

Plan = list[tuple[str, tuple[int, ...], torch.dtype]]
Producer = Callable[[str, int], torch.Tensor]

ALIGNMENT = 64  # torch's writer aligns every record's data to 64 bytes; mmap'ed loads rely on it
_FB_EXTRA_ID = 0x4246  # the zip "extra field" id torch pads its local headers with ("FB")

# torch's storage classes by dtype: what `torch.save` records in data.pkl (only float checkpoints are written)
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
                  torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                  torch.uint8: "ByteStorage", torch.int8: "CharStorage", torch.bool: "BoolStorage"}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a contiguous copy first when it is not contiguous)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pipelined(plan: Plan, produce: Producer, write: Callable[[str, torch.Tensor], None]) -> None:
    """produce(key, slot) for each planned tensor, handing each to `write` on one writer thread, in order: the next
    tensor is computed while the previous one is written. Two buffer slots: slot i % 2 is reused only after write
    i - 2 ended, which holds since write i - 1 is awaited before write i starts."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, (k, shape, dtype) in enumerate(plan):
            t = produce(k, i % 2)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{k}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            if pending is not None:
                pending.result()
            pending = pool.submit(write, k, t)
        if pending is not None:
            pending.result()


# ----------------------------------------------------------------------------------------------------------------------
# .pth


class _Storage:
    """A storage record in data.pkl: pickled as the persistent id torch's loader expects."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """A tensor in data.pkl: reduced to `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, {})`."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, tuple(int(s) for s in shape)

    def stride(self) -> tuple[int, ...]:
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= max(s, 1)
        return tuple(reversed(stride))


class _SkeletonPickler(pickle.Pickler):
    """Pickles {name: _Tensor} exactly as torch.save pickles {name: tensor} (tests/test_merge.py compares bytes)."""

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Tensor):
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, 0, obj.shape, obj.stride(), False, collections.OrderedDict()))
        return NotImplemented


def pth_pickle(plan: Plan) -> bytes:
    """data.pkl for the planned tensors; tensor i's bytes live in record data/i."""
    buf = io.BytesIO()
    obj = {k: _Tensor(_Storage(str(i), dtype, math.prod(shape)), shape) for i, (k, shape, dtype) in enumerate(plan)}
    _SkeletonPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _torch_small_records() -> list[tuple[str, bytes]]:
    """torch's own bookkeeping records (.format_version, .storage_alignment, byteorder, version,
    .data/serialization_id), in its order, from a tiny torch.save: whatever the installed torch writes."""
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as z:
        out = []
        for info in z.infolist():
            name = info.filename.split("/", 1)[1]
            if name != "data.pkl" and not name.startswith("data/"):
                out.append((name, z.read(info)))
    return out


def archive_name(path: str | Path) -> str:
    """The internal folder torch.save gives a file: its name up to the last dot ("archive" when that is empty)."""
    name = Path(path).name
    stem = name[: name.rfind(".")] if "." in name else name
    return stem or "archive"


class _ZipOut:
    """A zip written record by record onto an open file: stored, aligned, CRC'ed by zipfile."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.z = zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def record(self, name: str, size: int) -> zipfile.ZipExtFile:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size  # zipfile decides on a zip64 header from it, before any data is written
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
        start = self.z.start_dir + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
        pad = -start % ALIGNMENT
        info.extra = struct.pack("<HH", _FB_EXTRA_ID, pad) + b"Z" * pad
        return self.z.open(info, mode="w", force_zip64=zip64)

    def write_record(self, name: str, data: bytes | memoryview) -> None:
        with self.record(name, len(data)) as w:
            _write_all(w, data)

    def close(self) -> None:
        self.z.close()  # the central directory


def _write_all(f: Any, data: bytes | memoryview) -> None:
    """f.write, checked: a short write is an error, never silently ignored."""
    n = f.write(data)
    if n is not None and n != len(data):
        raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes)")


@contextlib.contextmanager
def _open_for_writing(path: str | Path) -> Iterator[io.BufferedWriter]:
    """Open `path` for writing; on success flush and fsync it; on failure close it without masking the error."""
    f = open(path, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()  # its final flush may fail again (the disk is still full): the first error is the one to tell
        raise
    f.close()


def write_pth_streaming(path: str | Path, plan: Plan, produce: Producer, archive: str | None = None) -> None:
    """A `torch.save` zip checkpoint of {name: tensor}, written without holding the tensors together.

    `archive`: the internal folder name; that of `path` by default (pass the final name's when `path` is a
    temporary: see `archive_name`). Any failed write raises OSError; the caller removes the partial file."""
    archive = archive or archive_name(path)
    with _open_for_writing(path) as f:
        out = _ZipOut(f)
        try:
            small = _torch_small_records()
            out.write_record(f"{archive}/data.pkl", pth_pickle(plan))
            head = [(n, d) for n, d in small if n != "version" and not n.startswith(".data/")]
            tail = [(n, d) for n, d in small if (n, d) not in head]
            for name, data in head:
                out.write_record(f"{archive}/{name}", data)
            index = {k: i for i, (k, _, _) in enumerate(plan)}

            def write(k: str, t: torch.Tensor) -> None:
                out.write_record(f"{archive}/data/{index[k]}", bytes_view(t))

            pipelined(plan, produce, write)
            for name, data in tail:
                out.write_record(f"{archive}/{name}", data)
            out.close()
        except BaseException:
            with contextlib.suppress(Exception):
                out.close()  # leaves zipfile with nothing left to write at garbage collection
            raise


def save_pth(tensors: Mapping[str, torch.Tensor], path: str | Path, archive: str | None = None) -> None:
    """`torch.save(dict(tensors), path)` with checked writes (see `write_pth_streaming`)."""
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_pth_streaming(path, plan, lambda k, slot: tensors[k], archive=archive)


# ----------------------------------------------------------------------------------------------------------------------
# safetensors


def write_safetensors_streaming(path: str | Path, plan: Plan, produce: Producer,
                                metadata: Mapping[str, str] | None = None,
                                rename: Callable[[str], str] = lambda k: k) -> None:
    """A safetensors file written tensor by tensor (header first: shapes and dtypes are known in advance). Any failed
    write raises OSError."""
    header: dict[str, Any] = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    offset = 0
    for k, shape, dtype in plan:
        n = nbytes(tuple(shape), dtype)
        header[rename(k)] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _open_for_writing(path) as f:
        _write_all(f, len(raw).to_bytes(8, "little"))
        _write_all(f, raw)
        pipelined(plan, produce, lambda k, t: _write_all(f, bytes_view(t)))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)` with checked writes: any failure is an OSError."""
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_safetensors_streaming(path, plan, lambda k, slot: tensors[k], metadata=metadata)
