"""Read a PyTorch checkpoint's structure WITHOUT torch and without running any of its code.

A ``.pt``/``.pth`` file is a pickle; unpickling it normally can call any importable function. Here the
pickle is read by an unpickler whose ``find_class`` resolves only a short whitelist (tensor rebuild
functions, storage types, dtypes, ``OrderedDict``); every other global becomes an inert placeholder
object that swallows its arguments and runs nothing. Tensors come back as :class:`TensorInfo`
(shape, dtype, storage key) checked against the storage records in the archive; their data is never
read. That is enough to tell what the file holds (``distill.ckpt_layout``: a GFL detector, ours or
mmdetection's, or a ResNet backbone) and to refuse files that are not checkpoints.

Both of torch's formats are read: the zip format (``torch.save`` since 1.6: ``<name>/data.pkl`` plus
one record per storage under ``<name>/data/``) and the legacy format (a sequence of pickles).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """The file is not a readable PyTorch checkpoint of a GFL detector (or of a ResNet backbone)."""


# Bytes per element of each legacy storage type, which is how torch names a storage's dtype in a pickle.
_STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
    "UntypedStorage": ("uint8", 1),
}
_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float", "double", "half", "long", "int", "short",
}  # fmt: skip
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class TensorInfo:
    """What a pickled tensor says about itself; its data is never loaded."""

    shape: tuple[int, ...]
    dtype: str
    storage_key: str
    storage_offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Opaque:
    """Stands in for any global outside the whitelist: accepts anything, does nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return Opaque()

    # Containers rebuilt by pickle's SETITEMS / APPENDS opcodes land here and are dropped.
    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


def _opaque_class(module: str, name: str) -> type[Opaque]:
    return type("Opaque", (Opaque,), {"qualname": f"{module}.{name}"})


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any = None, *_: Any) -> Any:
    if not isinstance(storage, StorageRef) or not isinstance(size, tuple | list):
        return Opaque()
    try:
        shape = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        return Opaque()
    return TensorInfo(shape, storage.dtype, storage.key, int(storage_offset or 0))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensor subclasses (nn.Parameter saved by some versions) go through here; only the
    # whitelisted rebuild function is honoured, with the subclass ignored.
    if callable(func) and func in (_rebuild_tensor, _rebuild_parameter) and isinstance(args, tuple):
        return func(*args)
    return Opaque()


class _Dict(dict):
    """A plain dict that also takes attributes: ``torch.save`` of a bare state dict pickles the
    OrderedDict's ``_metadata`` attribute, which pickle's BUILD sets on the rebuilt object."""


def _ordered_dict(*args: Any) -> dict:
    return _Dict(*args[:1]) if args and isinstance(args[0], list | dict) else _Dict()


def _safe_global(module: str, name: str) -> Any:
    """The whitelist. Returns the stand-in for ``module.name`` or None when it is not allowed."""
    if module == "collections" and name == "OrderedDict":
        return _ordered_dict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_tensor_v3"):
        return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _rebuild_parameter
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return ("storage-type", name)
    if module == "torch" and name in _DTYPE_NAMES:
        return f"torch.{name}"
    if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
        return {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict}[name]
    return None


class InertUnpickler(pickle.Unpickler):
    """An unpickler that never imports or calls what a file names, except what :meth:`allowed` returns:
    every other global becomes an inert :class:`Opaque` class. Subclasses say what is allowed (this
    module's torch-free tensor stand-ins, or ``distill.checkpoint``'s real torch rebuild functions)."""

    def allowed(self, module: str, name: str) -> Any | None:
        return None

    def find_class(self, module: str, name: str) -> Any:
        allowed = self.allowed(module, name)
        return allowed if allowed is not None else _opaque_class(module, name)


class _RestrictedUnpickler(InertUnpickler):
    def __init__(self, file: io.BufferedIOBase, storages: dict[str, StorageRef]):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def allowed(self, module: str, name: str) -> Any | None:
        return _safe_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id in checkpoint: {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not (isinstance(storage_type, tuple) and storage_type[0] == "storage-type"):
            raise CheckpointError("checkpoint storage has an unknown type")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError("checkpoint storage has an invalid size")
        dtype, itemsize = _STORAGE_DTYPES[storage_type[1]]
        ref = StorageRef(key, dtype, itemsize, numel)
        self.storages[key] = ref
        return ref


@dataclass
class Checkpoint:
    """The unpickled structure (tensors as :class:`TensorInfo`) and where the state dict is in it."""

    obj: Any
    state_dict: dict[str, TensorInfo]
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = "zip"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` (torch zip or legacy format) without executing anything from it.

    Raises :class:`CheckpointError` if it is not a torch checkpoint or holds no tensors.
    """
    path = Path(path)
    storages: dict[str, StorageRef] = {}
    if zipfile.is_zipfile(path):
        obj, fmt = _read_zip(path, storages), "zip"
    else:
        obj, fmt = _read_legacy(path, storages), "legacy"
    state_dict, meta = _find_state_dict(obj)
    if not state_dict:
        raise CheckpointError("the checkpoint holds no state dict of tensors")
    return Checkpoint(obj=obj, state_dict=state_dict, meta=meta, format=fmt)


def _read_zip(path: Path, storages: dict[str, StorageRef]) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"not a torch checkpoint: {e}") from e
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError("not a torch checkpoint: the archive has no single data.pkl")
        prefix = pkls[0][: -len("data.pkl")]
        info = zf.getinfo(pkls[0])
        if info.file_size > 256 * 2**20:
            raise CheckpointError("the checkpoint's pickle is implausibly large")
        obj = _unpickle(zf.read(pkls[0]), storages)
        sizes = {n[len(prefix) + len("data/") :]: zf.getinfo(n).file_size for n in names
                 if n.startswith(prefix + "data/")}  # fmt: skip
    for key, ref in storages.items():
        if key not in sizes:
            raise CheckpointError(f"the checkpoint is truncated: storage {key} is missing")
        if sizes[key] < ref.numel * ref.itemsize:
            raise CheckpointError(f"the checkpoint is truncated: storage {key} is too short")
    return obj


def _read_legacy(path: Path, storages: dict[str, StorageRef]) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _unpickle_stream(f, storages)
        except CheckpointError:
            raise
        except Exception as e:  # anything the pickle machinery raises on garbage
            raise CheckpointError("not a torch checkpoint (neither a zip archive nor a torch pickle)") from e
        if magic != _LEGACY_MAGIC:
            raise CheckpointError("not a torch checkpoint (neither a zip archive nor a torch pickle)")
        try:
            _unpickle_stream(f, storages)  # protocol version
            _unpickle_stream(f, storages)  # sys info
            return _unpickle_stream(f, storages)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"the checkpoint is corrupt: {type(e).__name__}") from e


def _unpickle(data: bytes, storages: dict[str, StorageRef]) -> Any:
    try:
        return _unpickle_stream(io.BytesIO(data), storages)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt pickle can raise nearly anything; none of it runs code
        raise CheckpointError(f"the checkpoint's pickle is corrupt: {type(e).__name__}: {e}"[:300]) from e


def _unpickle_stream(f: Any, storages: dict[str, StorageRef]) -> Any:
    return _RestrictedUnpickler(f, storages).load()


def _tensors(d: Any) -> dict[str, TensorInfo]:
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, TensorInfo)}


def _find_state_dict(obj: Any) -> tuple[dict[str, TensorInfo], dict[str, Any]]:
    """The largest tensor dict among the usual places (``state_dict``, ``model``, the object itself)."""
    if not isinstance(obj, dict):
        return {}, {}
    candidates = [obj] + [obj[k] for k in ("state_dict", "model", "model_state", "student", "weights") if k in obj]
    best = max((_tensors(c) for c in candidates), key=len)
    meta: dict[str, Any] = {}
    for k in ("meta", "metadata"):
        if isinstance(obj.get(k), dict):
            meta.update(_plain(obj[k]))
    if isinstance(obj.get("config"), dict):  # the project's DetectorConfig (classes, reg_max, strides, ...)
        meta["config"] = _plain(obj["config"])
    for k, v in obj.items():
        if isinstance(k, str) and k not in meta and not isinstance(v, dict | TensorInfo) and _is_plain(v):
            meta[k] = v
    return best, meta


def _is_plain(v: Any) -> bool:
    if isinstance(v, str | int | float | bool) or v is None:
        return True
    if isinstance(v, list | tuple):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def _plain(d: dict) -> dict[str, Any]:
    """Only the JSON-able parts of a metadata dict (placeholders and tensors dropped)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(k, str) and _is_plain(v):
            out[k] = list(v) if isinstance(v, tuple) else v
        elif isinstance(k, str) and isinstance(v, dict):
            out[k] = _plain(v)
    return out
