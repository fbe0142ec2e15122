"""Everything the trainer writes, each atomically (temp file or folder in the same place, then rename).

- the network: ``<output_dir>/<output_name>.safetensors`` (kohya key names, ``ss_*`` metadata);
- ``--save_state``: a folder ``<output_name>-step00000010-state`` (kohya's naming) with ``network.safetensors``,
  ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch, CUDA, Python, NumPy and the trainer's noise
  generator) and ``trainer_state.json`` (step, loss history), plus ``scaler.pt`` (loss scale, growth tracker)
  when an fp16 GradScaler is in use. ``--resume FOLDER`` reads it back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

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


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name keeps the extension: writers (kohya's save_weights) choose the format by it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        _make_shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_shareable(path, mode: int = 0o644) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual modes, minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def save_network(network, path: Path, dtype, metadata: dict | None) -> None:
    """The network's own ``save_weights`` into a temp file, renamed into place."""
    atomic_write(path, lambda tmp: network.save_weights(tmp, dtype, metadata))


def weights_fit(network, path: Path, what: str) -> None:
    """Raise SaveError when the tensors in ``path`` do not match the network's (names and shapes)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SaveError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise SaveError(f"{what} {str(path)!r} is not a readable .safetensors file: {e}") from None
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
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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


def model_file_name(output_name: str, step: int | None = None, epoch: int | None = None) -> str:
    """kohya's names: ``NAME-step00000010.safetensors``, ``NAME-000002.safetensors``, ``NAME.safetensors``."""
    if step is not None:
        return f"{output_name}-step{step:08d}.safetensors"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.safetensors"
    return f"{output_name}.safetensors"
