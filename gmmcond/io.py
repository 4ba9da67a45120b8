"""Files of a run directory: atomic writes, JSON, metrics.jsonl, checkpoints and the safetensors export.

Nothing read here executes code: checkpoints are loaded with ``torch.load(weights_only=True)`` (tensors
and plain Python values only) and exports are safetensors. A file that would need more than weights is a
:class:`CheckpointError`, never a silent unpickle.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import CheckpointError, RunError, StorageError

EXPORT_FORMAT = "gmmcond-ema-v1"


def free_space(path: Path) -> str:
    """The free space of the file system holding ``path`` (its nearest existing folder), e.g. '1.2 MB'."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    for unit in ("bytes", "kB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    return f"{free:.1f} TB"


DISK_MESSAGES = ("inline_container", "unexpected pos", "failed writing", "file write failed")  # torch.save's failed writes


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file beside it, synced, then renamed over it: a reader
    sees the old file or the whole new one, never a part. A write that fails (a full disk, a read-only folder)
    removes the temporary file, leaves ``path`` as it was and raises a :class:`StorageError` naming the path and
    the free space."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as RuntimeError ("[enforce fail at inline_container.cc] unexpected
        # pos", "PytorchStreamWriter failed writing file"); any other RuntimeError is not about the disk
        if isinstance(exc, RuntimeError) and not any(m in str(exc) for m in DISK_MESSAGES):
            raise
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:120]
        raise StorageError(f"could not write {path} ({reason}; {free_space(path)} free there): free some space or "
                           f"choose another folder, then run the command again; "
                           + (f"the previous {path.name} is as it was" if path.exists() else "nothing was written")) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def read_metrics(path: str | Path) -> list[dict]:
    """Return the records of a metrics.jsonl file (empty if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_seconds(times: list[float], skip: str = "first") -> float:
    """The median of step times in the order they were taken. ``skip`` says which to leave out: ``"first"`` (it
    holds compiling), ``"half"`` (the first half: compiling and the warm-up after it, which in a run of a few hundred
    steps are more than one interval) or ``"none"``."""
    return statistics.median({"none": times, "first": times[1:] or times, "half": times[len(times) // 2:]}[skip])


def median_sec_per_step(metrics: list[dict], skip: str = "first") -> float:
    """The median logged ``sec_per_step`` of a run's metrics rows (:func:`median_seconds`)."""
    timed = [m["sec_per_step"] for m in metrics if "sec_per_step" in m]
    if not timed:
        raise ValueError("no sec_per_step in these metrics rows: the run logged no training interval yet")
    return median_seconds(timed, skip)


def append_metrics(path: str | Path, records: Iterable[dict]) -> None:
    """Append records to a metrics.jsonl file (a failed write is a :class:`StorageError` naming it). The lines go
    out in one ``write`` to a file opened for appending, so processes appending to one file at once (the workers of
    ``reproduce.py --jobs``) never interleave inside a line."""
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(28, f"wrote {written} of {len(data)} bytes")
    except OSError as exc:
        raise StorageError(f"could not append to {path} ({exc.strerror}; {free_space(Path(path))} free there): free "
                           f"some space, then run the command again") from None


class ResultLog:
    """Append-only JSONL of finished (arm, seed, ...) results, so an interrupted experiment resumes: a re-run
    skips every key already in the file, and each result lands on disk the moment it is done."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = read_metrics(self.path)  # one JSON object per line, like metrics.jsonl

    @staticmethod
    def key(record: dict, fields) -> tuple:
        return tuple(record[f] for f in fields)

    def refresh(self) -> None:
        """Read the file again: what other processes appended since (the workers of ``reproduce.py --jobs``)."""
        self.records = read_metrics(self.path)

    def done(self, fields, **key) -> dict | None:
        """Return the finished record with these key values, or None."""
        want = tuple(key[f] for f in fields)
        return next((r for r in self.records if self.key(r, fields) == want), None)

    def add(self, record: dict) -> dict:
        if not self.records:  # the first record: an experiment's OUT folder may not exist yet
            self.path.parent.mkdir(parents=True, exist_ok=True)
        append_metrics(self.path, [record])
        self.records.append(record)
        return record

    def once(self, key: dict, compute: Callable[[], dict]) -> dict:
        """The record logged under ``key`` (every key field equal) if there is one, else ``compute()`` logged under
        it the moment it returns: the one resumable unit of every experiment, probe, sweep and measurement (a
        killed one reruns only what it had not logged)."""
        done = self.done(tuple(key), **key)
        return done if done is not None else self.add({**key, **compute()})


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop the records logged after ``last_step`` (a resumed run logs them again)."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Return the run's checkpoint folder."""
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: str | Path) -> int:
    """The step a ``step_NNNNNNN.pt`` checkpoint was written at."""
    return int(Path(path).stem.split("_")[-1])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Return the run's checkpoints, oldest first."""
    return sorted(checkpoint_dir(run_dir).glob("step_*.pt"))


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2, protect: Path | None = None) -> Path:
    """Write ``checkpoints/step_NNNNNNN.pt`` atomically, point ``latest`` at it, prune old ones (all but the
    newest ``keep``, and never ``protect``: the trainer's last checkpoint from before a loss spike)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    write_atomically(path, lambda tmp: torch.save(state, tmp))
    atomic_write_bytes(folder / "latest", path.name.encode())
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if protect is None or old.name != Path(protect).name:
            old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the checkpoint ``latest`` points at, or None if the run has none."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.exists():
        others = [p.name for p in list_checkpoints(run_dir)]
        raise CheckpointError(f"{pointer} names {path.name}, which is missing; resume from one of {others} with "
                              f"--resume-from PATH (or --resume previous), or start a new run")
    return path


def previous_checkpoint(run_dir: str | Path) -> Path:
    """Return the newest checkpoint older than the one ``latest`` names (for ``--resume previous``)."""
    pointer = checkpoint_dir(run_dir) / "latest"
    current = pointer.read_text().strip() if pointer.exists() else None
    older = [p for p in list_checkpoints(run_dir) if current is None or p.name < current]
    if not older:
        raise CheckpointError(f"{checkpoint_dir(run_dir)} holds no checkpoint older than {current}; start a new run")
    return older[-1]


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (weights only), or raise CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    others = sorted(p.name for p in path.parent.glob("step_*.pt") if p != path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "global" in str(exc).lower():
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors and plain values, so loading it could run code; "
                f"refused. gmmcond checkpoints never need that: use a checkpoint written by gmmcond, or "
                f"load this file yourself only if you trust where it came from") from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}). Resume from an earlier one "
                              f"({others or 'none left'}) with --resume-from PATH, or start a new run") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}). Resume from "
                              f"an earlier one ({others or 'none left'}) with --resume-from PATH, or start a new run") from exc
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a gmmcond checkpoint (no 'step'/'model' entries)")
    return state


# ------------------------------------------------------------------------------------------------ run lock


class RunLock:
    """``RUN/train.lock``: one training at a time per run directory.

    The file holds the owner's pid, host and start time; it is created with O_EXCL, so of two trainings
    started at once exactly one gets it. A lock left by a process that died (kill -9, a crash) is found
    stale when its pid is gone on this host and taken over; a lock from another host cannot be checked
    and is an error that says how to clear it.
    """

    NAME = "train.lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.NAME
        self.held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            return True
        return True

    def acquire(self) -> str | None:
        """Take the lock or raise RunError naming its holder; return a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and pid != me["pid"] and not self._alive(pid):
                    note = f"note: took over {self.path}, left by process {pid} (no longer running)"
                    self.path.unlink(missing_ok=True)
                    continue
                where = f"process {pid} on {host}" if pid else "another process"
                since = f" since {owner['started']}" if owner.get("started") else ""
                raise RunError(f"{self.path.parent} is being trained by {where}{since} ({self.path}); wait for it to "
                               f"finish, train into another --name, or delete {self.path} if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return note
        raise RunError(f"could not take {self.path}; delete it if no training is running in {self.path.parent}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


class Claim:
    """An advisory lock on ``PATH.claim`` (``flock``, not blocking): which of several processes working through the
    same list (the workers of ``reproduce.py --jobs``) does an item. The kernel releases it when its holder exits,
    however it exits, so a killed worker leaves nothing to clear."""

    def __init__(self, path: str | Path):
        self.path = Path(f"{path}.claim")
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the claim; False when another process holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


# ------------------------------------------------------------------------------------------ safetensors export


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write tensors and string metadata to a safetensors file atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta))


def read_safetensors(path: str | Path, error: type[Exception]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (no code runs); an unreadable file raises ``error`` naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise error(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    return tensors, meta


def export_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], cfg: dict, info: dict, step: int) -> None:
    """Write weights to safetensors with the resolved config, dataset facts and step in its metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"config": json.dumps(cfg), "dataset": json.dumps(info), "step": str(step), "format": EXPORT_FORMAT}
    write_safetensors(path, tensors, meta)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an export: (tensors, metadata with ``config``/``dataset`` decoded and ``step`` an int)."""
    tensors, meta = read_safetensors(path, CheckpointError)
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a gmmcond export (metadata format {meta.get('format')!r}, "
                              f"expected {EXPORT_FORMAT!r})")
    meta["config"], meta["dataset"], meta["step"] = json.loads(meta["config"]), json.loads(meta["dataset"]), int(meta["step"])
    return tensors, meta
