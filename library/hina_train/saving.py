"""Everything the trainer writes, each atomically (temp file or folder in the same place, then rename).

- the network: ``<output_dir>/<output_name>.safetensors`` (kohya key names, ``ss_*`` metadata);
- ``--save_state``: a folder ``<output_name>-step00000010-state`` (kohya's naming) with ``network.safetensors``,
  ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch, CUDA, Python, NumPy and the trainer's noise
  generator) and ``trainer_state.json`` (step, loss history), plus ``scaler.pt`` (loss scale, growth tracker)
  when an fp16 GradScaler is in use. ``--resume FOLDER`` reads it back.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from library.hina.atomic_file import TEMP_MARK, fsync_folder, is_temp_name, write_atomic

STATE_FILES = ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
# only with an fp16 GradScaler (accelerate makes one for fp16 on CUDA, none on CPU); optional on --resume, so
# folders saved before it existed, or by a run without a scaler, still resume (with a fresh scale)
SCALER_FILE = "scaler.pt"


class SaveError(ValueError):
    """An output or state problem found before training; the message names the path."""


def check_writable(folder: Path) -> None:
    """Fail now, naming ``folder``, when it cannot be created or written. Leaves nothing behind."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SaveError(f"--output_dir {str(folder)!r}: {str(probe)!r} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SaveError(f"--output_dir {str(folder)!r} is not writable ({str(probe)!r} denies writing)")
    try:  # os.access says yes to root and can be wrong on network file systems: try a real write
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".hina-write-test."))
    except OSError as e:
        raise SaveError(f"--output_dir {str(folder)!r} is not writable ({str(probe)!r}: {e.strerror})") from None


# Every temp file or folder the trainer makes beside an output starts with a dot and ends in ".tmp" or holds
# ".tmp." (atomic_file's names; networks/lokr.py's writer too): ``remove_stale_temps`` finds leftovers by this.
TEMP_SUFFIX = TEMP_MARK
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(SaveError):
    """The disk filled up while writing an output; earlier outputs are intact and our temp file is gone."""


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def disk_full_error(path: Path, needed: int | None, written: int, e: OSError) -> DiskFullError:
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    need = f"needs about {_mb(needed)}" if needed else f"{_mb(written)} were written before it failed"
    return DiskFullError(
        f"could not write {str(path)!r}: {e.strerror or 'no space left on the device'} ({need}"
        + (f", {_mb(free)} free" if free is not None else "") + "); earlier saves are kept and the partial "
        "file was removed: free some space (or choose another --output_dir) and --resume from the last state")


def atomic_write(path: Path, write, needed_bytes: int | None = None) -> None:
    """Call ``write(tmp_path)``, fsync, then rename the temp file onto ``path`` (``library.hina.atomic_file``,
    the project's one writer).

    On any failure (a full disk, a SIGTERM turned into SystemExit by the CLI) the temp file is removed and
    ``path`` keeps its previous content. A full disk becomes ``DiskFullError`` naming the file and the space
    needed (``needed_bytes`` when the caller knows it, else what was written before the failure).
    """
    try:
        write_atomic(path, write)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise disk_full_error(Path(path), needed_bytes, getattr(e, "partial_bytes", 0), e) from None
        raise


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files and folders a killed earlier run left in ``folder`` (ours only: dot names with
    ``.tmp``); returns what was removed. Call before this run writes there."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if is_temp_name(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: the size a save of it needs, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _make_shareable(path, mode: int = 0o644) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual modes, minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def save_network(network, path: Path, dtype, metadata: dict | None) -> None:
    """The network's own ``save_weights`` into a temp file, renamed into place (any network module: a foreign
    one, e.g. LyCORIS', writes in place)."""
    state = network.state_dict()
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    needed = sum(v.numel() * (itemsize or v.element_size()) for v in state.values())
    atomic_write(path, lambda tmp: network.save_weights(tmp, dtype, metadata), needed_bytes=needed)


def weights_fit(network, path: Path, what: str) -> None:
    """Raise SaveError when the tensors in ``path`` do not match the network's (names and shapes)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SaveError(f"{what} {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:  # --save_model_as ckpt/pt: a torch-saved dict of tensors
            shapes = {k: tuple(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    except Exception as e:
        raise SaveError(f"{what} {str(path)!r} is not a readable {path.suffix or 'weights'} file: {e}") from None
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) have another shape (e.g. {k}: file {list(shapes[k])}, "
                         f"network {list(expected[k])})")
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the network are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) in the file are not in the network (e.g. {unexpected[0]})")
        raise SaveError(f"{what} {str(path)!r} does not fit this model and network "
                        f"(check --network_module, --network_dim, --network_args, the base model): "
                        + "; ".join(parts))


def rng_state(generator: torch.Generator) -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def recover_state_folder(folder: Path) -> None:
    """Finish or undo a ``save_state`` that was killed while it replaced an existing folder.

    Replacing takes two renames (old folder aside into ``.NAME.old.*/state``, new one in). Killed between them,
    ``folder`` is missing and the previous state waits in the aside folder: move it back. Killed after both,
    only the aside folder is left: remove it.
    """
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    for aside in sorted(folder.parent.glob(f".{folder.name}.old.*")):
        kept = aside / "state"
        if not folder.exists() and kept.is_dir():
            os.replace(kept, folder)
            print(f"note: restored {str(folder)!r}, left aside by a save that was interrupted")
        shutil.rmtree(aside, ignore_errors=True)


def save_state(folder: Path, network, optimizer, scheduler, generator, trainer_state: dict,
               scaler=None) -> None:
    """Write the resumable state into ``folder`` through a temp folder renamed into place.

    ``scaler``: the fp16 GradScaler (``accelerator.scaler``) or None; its state goes into ``scaler.pt``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_state_folder(folder)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMP_SUFFIX))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
        save_file(tensors, str(staging / "network.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(generator), staging / "rng.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), staging / SCALER_FILE)
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        _make_shareable(staging, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / "state")
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except OSError as e:
        written = sum(_size(p) for p in staging.glob("*")) if staging.is_dir() else 0
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in NO_SPACE:
            needed = tensor_bytes(network.state_dict()) + tensor_bytes(optimizer.state_dict())
            raise disk_full_error(folder, needed, written, e) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(folder.parent)


def check_state_files(folder: Path) -> None:
    """A ``--resume`` folder must hold every file ``save_state`` writes (checked before anything is loaded)."""
    folder = Path(folder)
    recover_state_folder(folder)
    if not folder.is_dir():
        raise SaveError(f"--resume {str(folder)!r} is not a folder (expected a state folder written by --save_state)")
    missing = [name for name in STATE_FILES if not (folder / name).is_file()]
    if missing:
        raise SaveError(f"--resume {str(folder)!r} is not a complete state folder: missing {', '.join(missing)}")


def check_state(folder: Path, network) -> dict:
    """Validate a ``--resume`` folder against the network; returns its trainer_state.json."""
    folder = Path(folder)
    check_state_files(folder)
    weights_fit(network, folder / "network.safetensors", "--resume network")
    try:
        return json.loads((folder / "trainer_state.json").read_text())
    except ValueError as e:
        raise SaveError(f"--resume {str(folder)!r}: trainer_state.json is not valid JSON: {e}") from None


def load_state(folder: Path, network, optimizer, scheduler, generator, scaler=None) -> None:
    from safetensors.torch import load_file

    folder = Path(folder)
    network.load_state_dict(load_file(str(folder / "network.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False), generator)
    load_scaler(folder, scaler)


def load_scaler(folder: Path, scaler) -> None:
    """Restore the fp16 GradScaler's loss scale and growth tracker from ``scaler.pt``, when both exist.

    Loaded before the scaler's first step, it starts from the saved scale (GradScaler creates its scale
    tensor lazily from the loaded value). Either side missing is not an error: the folder may predate
    ``scaler.pt`` or come from a run without fp16 scaling, and this run may use none; a note says so.
    """
    path = Path(folder) / SCALER_FILE
    has_file = path.is_file()
    if scaler is not None and scaler.is_enabled():
        if has_file:
            scaler.load_state_dict(torch.load(path, weights_only=False))
        else:
            print(f"note: --resume {str(folder)!r} has no {SCALER_FILE}: the fp16 loss scale starts fresh "
                  f"({scaler.get_scale():g})")
    elif has_file:
        print(f"note: --resume {str(folder)!r} holds an fp16 loss scale ({SCALER_FILE}) but this run uses no "
              f"grad scaler: ignored")


def state_folder_name(output_name: str, step: int | None = None, epoch: int | None = None) -> str:
    """kohya's names: ``NAME-step00000010-state``, ``NAME-000002-state``, ``NAME-state``."""
    if step is not None:
        return f"{output_name}-step{step:08d}-state"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}-state"
    return f"{output_name}-state"


def model_file_name(output_name: str, step: int | None = None, epoch: int | None = None,
                    ext: str = "safetensors") -> str:
    """kohya's names: ``NAME-step00000010.safetensors``, ``NAME-000002.safetensors``, ``NAME.safetensors``
    (``ext``: ``--save_model_as``; ``ckpt``/``pt`` files hold the tensors alone, without metadata)."""
    if step is not None:
        return f"{output_name}-step{step:08d}.{ext}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.{ext}"
    return f"{output_name}.{ext}"


def epoch_save_to_remove(epoch: int, every_n_epochs: int, last_n: int | None) -> int | None:
    """kohya's ``--save_last_n_epochs``: after saving epoch ``epoch``, the epoch save that falls out of the
    last ``last_n`` (``epoch - every * last_n``), or None."""
    if not last_n:
        return None
    old = epoch - every_n_epochs * last_n
    return old if old > 0 else None


def step_save_to_remove(step: int, every_n_steps: int, last_n_steps: int | None) -> int | None:
    """kohya's ``--save_last_n_steps``: keep the step saves of the last ``last_n_steps`` steps; after saving at
    ``step`` the one to remove is the multiple of ``every_n_steps`` at or below ``step - last_n_steps - 1``."""
    if not last_n_steps:
        return None
    old = step - last_n_steps - 1
    old -= old % every_n_steps
    return old if old > 0 else None


def remove_output(path: Path) -> None:
    """Remove an older save (file or state folder) that fell out of a --save_last_n_* window."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
        print(f"removed old save {path}")
    elif path.exists():
        path.unlink()
        print(f"removed old save {path}")
