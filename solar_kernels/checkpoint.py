"""Hugging Face checkpoint directories, read lazily and written atomically (docs/method.md#checkpoint-layout).

A checkpoint directory holds ``config.json``, optionally ``generation_config.json`` and tokenizer
files, and the weights as one ``model.safetensors`` or as ``model-0000k-of-0000N.safetensors``
shards plus ``model.safetensors.index.json``.

- ``CheckpointReader`` validates the directory up front (every shard present, every header
  well-formed and no shorter than the data it declares, every indexed tensor where the index says)
  and then reads one tensor at a time; a whole checkpoint is never loaded.
- ``ShardWriter`` writes tensors in order into shards no larger than ``max_shard_size`` (only the
  shard being filled is held in memory), then names them and writes the index.
- ``output_directory`` builds the result in a temporary directory beside the destination and
  renames it into place only when complete; on any error (Ctrl-C included) the temporary directory
  is removed and the destination is untouched. An existing destination is refused unless
  ``force=True``. The temporary directory holds a marker (owner pid, host, tool, start time), so a
  run that was killed outright leaves a folder the next run for that destination recognizes and
  removes; a folder without the marker, or whose owner is still running, is never touched.
  Every file and folder written gets the mode a plain ``open``/``mkdir`` gives under the umask.
- ``read_config`` reads and checks ``config.json`` (UTF-8, a JSON object, the types of the keys this
  package reads) for every reader; ``write_config`` writes one for every writer, without
  ``auto_map``: outputs never point transformers at remote code.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied beside the weights when a checkpoint is rewritten (tokenizer and generation settings).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The float dtypes a user names (--dtype, YAML, benchmark and self-check options): short names, used
# in result files and test ids, and torch's own names; parse_dtype accepts both.
SHORT_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPE_NAMES = {
    **{str(dtype).removeprefix("torch."): dtype for dtype in SHORT_DTYPE_NAMES},
    **{short: dtype for dtype, short in SHORT_DTYPE_NAMES.items()},
}


# config.json keys this package reads, and the JSON types each may have (None: JSON null).
_INT, _NUMBER, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
CONFIG_KEY_TYPES: dict[str, tuple] = {
    **{
        key: _INT
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
    },
    **{
        key: (*_INT, type(None))
        for key in ("num_key_value_heads", "head_dim", "sliding_window", "bos_token_id", "pad_token_id")
    },
    "eos_token_id": (int, list, type(None)),
    **{key: _NUMBER for key in ("rms_norm_eps", "rope_theta", "initializer_range")},
    **{key: _BOOL for key in ("tie_word_embeddings", "attention_bias", "mlp_bias")},
    **{key: _STR for key in ("model_type", "hidden_act")},
    "architectures": (list,),
    **{key: (dict, type(None)) for key in ("rope_scaling", "rope_parameters")},
}
# config.json / tokenizer_config.json key naming Python classes transformers downloads and runs
# (with trust_remote_code=True). Never written into an output.
REMOTE_CODE_KEY = "auto_map"
PathLike = str | os.PathLike
# A decoder layer's tensor name: the layer index, then the name inside the layer.
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Written into every temporary output directory; names the run that owns it.
PARTIAL_MARKER = ".solar_kernels-partial.json"
_PARTIAL_KIND = "solar_kernels partial output"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as it claims, or an output that cannot be written."""


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_config_types(config, where: str) -> dict:
    """``config`` (a parsed config.json) if it is a JSON object whose known keys have the types
    this package expects (``CONFIG_KEY_TYPES``); else a one-line ``CheckpointError``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object {{...}}, got a JSON {_json_type(config)}")
    for key, allowed in CONFIG_KEY_TYPES.items():
        if key not in config:
            continue
        value = config[key]
        # JSON true/false are bools, which Python also counts as ints: an int key takes no bool.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join(_json_type(t()) if t is not type(None) else "null" for t in allowed)
            raise CheckpointError(f"{where}: key {key!r}: expected {expected}, got {_json_type(value)} ({value!r})")
    return config


def read_config(path: Path) -> dict:
    """A config.json file, parsed and checked (``check_config_types``); errors name the file."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    return check_config_types(config, str(path))


def _without_remote_code(data: dict, source: str) -> dict:
    """``data`` less ``auto_map``, with a warning saying why, when it has one."""
    if REMOTE_CODE_KEY not in data:
        return data
    data = dict(data)
    classes = data.pop(REMOTE_CODE_KEY)
    logger.warning(
        "dropped %s %s from %s: it names remote code that transformers would download and run "
        "(trust_remote_code=True); the output loads with transformers' own classes",
        REMOTE_CODE_KEY,
        json.dumps(classes, sort_keys=True),
        source,
    )
    return data


def write_config(directory: Path, config: dict, *, source: str = "config.json") -> None:
    """Writes ``directory/config.json``, never with ``auto_map`` (see ``REMOTE_CODE_KEY``)."""
    write_json(Path(directory) / "config.json", _without_remote_code(config, source))


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {name!r}")
    return DTYPE_NAMES[key]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
        if not match:
            raise ValueError(f"max_shard_size must be bytes or a size like '5GB', got {size!r}")
        units = {
            None: 1,
            "B": 1,
            "KB": 10**3,
            "MB": 10**6,
            "GB": 10**9,
            "TB": 10**12,
            "KIB": 2**10,
            "MIB": 2**20,
            "GIB": 2**30,
            "TIB": 2**40,
        }
        value = int(float(match.group(1)) * units[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked against the file's size."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {file_size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len <= 0 or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes, file has {file_size})"
                )
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        if isinstance(error, FileNotFoundError):
            raise CheckpointError(f"{path}: file is missing") from error
        raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from error
        if end > data_size or start > end:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data_size}"
            )
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}")
    return header


class CheckpointReader:
    """A Hugging Face checkpoint directory, validated on open, read one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory (it does not exist or is a file)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: config.json is missing")
        self.config: dict = read_config(config_path)
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            self._read_index(index_path)
        elif (self.path / SINGLE_FILE).is_file():
            header = read_header(self.path / SINGLE_FILE)
            for name, info in header.items():
                self._file_of[name] = self.path / SINGLE_FILE
                self._info[name] = info
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} and no {INDEX_FILE}")

    def _read_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a safetensors index (needs a weight_map)") from error
        headers: dict[str, dict] = {}
        for name, file_name in weight_map.items():
            if file_name not in headers:
                headers[file_name] = read_header(self.path / file_name)
            if name not in headers[file_name]:
                raise CheckpointError(f"{self.path / file_name}: tensor {name!r} listed in {INDEX_FILE} is missing")
            self._file_of[name] = self.path / file_name
            self._info[name] = headers[file_name][name]

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._info[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        start, end = self._info[name]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now into memory of its own.

        safetensors hands out views of a memory map; copying the tensor out and closing the file
        right away keeps the process's memory to the tensors still in use, not the files read.
        """
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint")
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name).clone()


class ShardWriter:
    """Writes tensors, in the order given, into safetensors shards of at most ``max_shard_size``
    bytes (a single tensor larger than that gets a shard of its own)."""

    def __init__(self, directory: Path, max_shard_size: int | str = "5GB"):
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.directory / file_name), metadata={"format": "pt"})
        follow_umask(self.directory / file_name)  # safetensors creates its files private (0600)
        self._shards.append((file_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Names the shards (one file: model.safetensors; else model-k-of-N + index); returns them."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.directory / self._shards[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for k, (temporary, tensor_names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / temporary, self.directory / final)
            names.append(final)
            weight_map.update({tensor: final for tensor in tensor_names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def set_config_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Record ``dtype`` in a config.json dict: in whichever of ``dtype`` (transformers 5) and
    ``torch_dtype`` (4.x) it has, else in ``torch_dtype``, which both read."""
    name = str(dtype).replace("torch.", "")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    config.update({key: name for key in keys})
    return config


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(path: Path) -> None:
    """Gives ``path`` the mode a plain ``open``/``mkdir`` would: 0666 (files) or 0777 (folders)
    less the umask. tempfile and safetensors create theirs private (0600/0700)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_current_umask())


def path_relation(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How ``path`` overlaps ``other`` once symlinks and ``..`` are resolved: "is", "is inside",
    "contains", or None when they do not."""
    path, other = Path(path).resolve(), Path(other).resolve()
    if path == other:
        return "is"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "contains"
    return None


def check_destination(dst: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> None:
    """Refuses a ``dst`` that is, is inside or contains one of ``sources`` (``path_relation``), so
    that no run, with ``force`` or not, can replace or write into its own input."""
    for source in sources:
        relation = path_relation(dst, source)
        if relation is None:
            continue
        target, origin = Path(dst).resolve(), Path(source).resolve()
        resolved = "" if (str(target), str(origin)) == (str(dst), str(source)) else f" ({target} and {origin})"
        raise ValueError(
            f"destination {dst} {relation} the source checkpoint {source}{resolved}; "
            f"write the output to a directory outside every source"
        )


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no way to ask without side effects here: treat the owner as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _remove_stale_partials(dst: Path) -> None:
    """Removes the temporary directories of earlier runs for ``dst`` that died without cleaning up:
    those whose marker names ``dst``, this host and a pid that is no longer running."""
    parent, prefix, target = dst.parent, f".{dst.name}.", str(dst.resolve())
    if not parent.is_dir():
        return
    for folder in parent.iterdir():
        if not (folder.name.startswith(prefix) and folder.name.endswith(".partial") and folder.is_dir()):
            continue
        try:
            marker = json.loads((folder / PARTIAL_MARKER).read_text())
            pid, host, destination = marker["pid"], marker["host"], marker["destination"]
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not ours, or unreadable: leave it alone
        if not (
            marker.get("kind") == _PARTIAL_KIND
            and destination == target
            and host == socket.gethostname()
            and isinstance(pid, int)
            and not isinstance(pid, bool)
            and pid > 0
        ) or _pid_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info(
            "removed %s: the partial output of an interrupted %s (pid %d on %s, started %s)",
            folder,
            marker.get("tool", "run"),
            pid,
            host,
            marker.get("started", "?"),
        )


@contextlib.contextmanager
def output_directory(
    dst: str | os.PathLike, *, force: bool = False, expected_bytes: int = 0, tool: str = "solar_kernels"
) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``dst`` when the block completes without error.

    Refuses an existing ``dst`` unless ``force``; removes the partial outputs earlier runs for
    ``dst`` left when killed (see the module docstring), then checks that the disk has
    ``expected_bytes`` free (plus 1%) before anything is written. With ``force`` the old ``dst`` is
    replaced only after the new one is complete. ``tool`` names the writer in the marker.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} already exists (pass force=True / --force to replace it)")
    parent = dst.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dst)
    free = shutil.disk_usage(parent).free
    if expected_bytes and free < expected_bytes * 1.01:
        raise CheckpointError(
            f"not enough disk space for {dst}: needs about {expected_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=parent))
    try:
        follow_umask(tmp)
        marker = {
            "kind": _PARTIAL_KIND,
            "tool": tool,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "destination": str(dst.resolve()),
        }
        write_json(tmp / PARTIAL_MARKER, marker)
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        if dst.exists():
            old = parent / f".{dst.name}.old-{os.getpid()}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer and generation files that exist in ``src`` into ``dst`` (new files,
    so their mode follows the umask); a tokenizer_config.json loses its ``auto_map``, if any."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    tokenizer_config = dst / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None  # transformers cannot read it either, so it cannot point at code: copied as is
        if isinstance(data, dict) and REMOTE_CODE_KEY in data:
            write_json(tokenizer_config, _without_remote_code(data, str(src / tokenizer_config.name)))
    return copied


def write_hf_files(
    tmp: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    *,
    config_source: str = "config.json",
    side_files_from: str | os.PathLike | None = None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """The one Hugging Face checkpoint writer (save_pretrained, merge, upscale), into the directory
    ``output_directory`` yields: the side files of ``side_files_from`` (tokenizer, generation
    config), config.json (``write_config``: never ``auto_map``), then the ``(name, tensor)`` pairs in
    order through ``ShardWriter``. The caller adds its extra files (a model card) in the same
    ``with`` block. Returns the side files copied."""
    copied = copy_side_files(Path(side_files_from), tmp) if side_files_from is not None else []
    write_config(tmp, config, source=config_source)
    writer = ShardWriter(tmp, max_shard_size)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.finish()
    return copied
