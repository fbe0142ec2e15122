"""What the trainer writes and keeps, as kohya's train_network.py: save windows, formats, metadata, precision,
and what a full disk or a SIGTERM during a save leaves behind.

Claims tested
- ``--save_last_n_epochs`` / ``--save_last_n_steps`` (and ``_state``) remove the saves that fall out of the
  window with kohya's arithmetic; ``--save_model_as pt`` writes a torch file of the same tensors.
- ``--metadata_*`` land in the file as ``modelspec.*``; ``--full_bf16`` trains the network in bfloat16 (and
  lets AdamWBF16_HinaAdaptive run); ``--fp8_base`` keeps the base Linear/Conv weights in float8.
- a full disk during a save: one message naming the file and the space needed; the previous file is intact
  and no temp file is left. A SIGTERM during a save leaves no temp file; a later run removes stale ones.
- an existing output replaced by this run's first save gets a one-line notice.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.hina_train import loop, saving
from library.hina_train.cli import run

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

REPO = Path(__file__).resolve().parent.parent


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the singleton fixes mixed_precision per process


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Runs here use bf16 and no mixed precision in one process."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def test_kohya_removal_arithmetic():
    # save_every_n_epochs=2, save_last_n_epochs=2: saving epoch 6 removes epoch 2
    assert saving.epoch_save_to_remove(6, 2, 2) == 2 and saving.epoch_save_to_remove(4, 2, 2) is None
    # kohya's comment: save_every_n_steps=10, save_last_n_steps=30 -> at step 50 keep 30 steps, remove step 10
    assert saving.step_save_to_remove(50, 10, 30) == 10 and saving.step_save_to_remove(40, 10, 30) is None
    assert saving.step_save_to_remove(50, 10, None) is None


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """32 demo images, batch 32 -> one step per epoch; 3 epochs, an epoch save each, keep the last one."""
    _reset_accelerate()
    out = tmp_path_factory.mktemp("bf16")
    thumb = out.parent / "thumb.png"
    thumb.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    result = run(["--resolution", "32", "--train_batch_size", "32", "--max_train_epochs", "3",
                  "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--output_dir", str(out),
                  "--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "AdamWBF16_HinaAdaptive",
                  "--learning_rate", "1e-3", "--metadata_title", "T", "--metadata_author", "me",
                  "--metadata_license", "CC0", "--metadata_tags", "a,b", "--metadata_thumbnail", str(thumb)])
    return out, result


def test_save_last_n_epochs_keeps_the_window(bf16_run):
    out, result = bf16_run
    assert result["global_step"] == 3
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert names == ["demo-000002.safetensors", "demo.safetensors"]  # epoch 1 removed after epoch 2's save


def test_metadata_fields_and_bf16_network(bf16_run):
    out, _ = bf16_run
    with safe_open(str(out / "demo.safetensors"), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        up = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert meta["modelspec.title"] == "T" and meta["modelspec.author"] == "me"
    assert meta["modelspec.license"] == "CC0" and meta["modelspec.tags"] == "a,b"
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "32x32"
    assert dtypes == {torch.bfloat16}  # the network trained (and saved) in bfloat16
    assert any(t.abs().sum() > 0 for t in up)  # it trained: lora_up starts at zero


def test_steps_window_states_pt_format_and_fp8_base(tmp_path, monkeypatch):
    cast = []
    real = loop.precision.cast_base_to_fp8
    monkeypatch.setattr(loop.precision, "cast_base_to_fp8", lambda m: cast.append(m) or real(m))
    run(["--resolution", "32", "--train_batch_size", "8", "--max_train_steps", "4", "--save_every_n_steps", "1",
         "--save_last_n_steps", "1", "--save_state", "--save_model_as", "pt", "--output_dir", str(tmp_path),
         "--mixed_precision", "bf16", "--fp8_base"])
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("demo") and not p.name.startswith("demo_"))
    # at step 3, kohya's window (3 - 1 - 1 = 1) removes step 1's file and state; step 4 is the final save
    assert names == ["demo-state", "demo-step00000002-state", "demo-step00000002.pt", "demo-step00000003-state",
                     "demo-step00000003.pt", "demo.pt"]
    tensors = torch.load(tmp_path / "demo.pt", weights_only=True)
    assert any(k.endswith("lora_up.weight") for k in tensors)
    assert cast and all(layer.weight.dtype == torch.float8_e4m3fn for model in cast
                        for layer in model.modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)))


def _fill_disk_after(n_bytes):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_full_disk_names_the_file_keeps_the_old_one_and_cleans_up(tmp_path):
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"previous good save")
    with pytest.raises(saving.DiskFullError) as info:
        saving.atomic_write(path, _fill_disk_after(1000), needed_bytes=5 * 2**20)
    message = str(info.value)
    assert str(path) in message and "needs about 5.0 MiB" in message and "free" in message
    assert "\n" not in message
    assert path.read_bytes() == b"previous good save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_full_disk_during_a_state_save(tmp_path, monkeypatch):
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving.torch, "save", full)
    with pytest.raises(saving.DiskFullError, match="could not write .*demo-state.*needs about"):
        saving.save_state(tmp_path / "demo-state", net, opt, sched, torch.Generator(), {"global_step": 1})
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mid_training_is_one_line(tmp_path, monkeypatch, capsys):
    from library.hina_train import cli

    monkeypatch.setattr(loop, "save_network", lambda net, path, dtype, meta: saving.atomic_write(
        path, _fill_disk_after(10)))
    code = cli.main(["--resolution", "32", "--train_batch_size", "32", "--max_train_steps", "1",
                     "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT
    assert "error: could not write" in err and "demo.safetensors" in err and "Traceback" not in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_during_a_save_leaves_no_temp_file(tmp_path):
    script = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from library.hina_train.cli import exit_on_sigterm
        from library.hina_train.saving import atomic_write
        exit_on_sigterm()
        def slow(tmp):
            Path(tmp).write_bytes(b"partial")
            Path({str(tmp_path / "started")!r}).write_text("1")
            time.sleep(60)
        atomic_write(Path({str(tmp_path / "out" / "net.safetensors")!r}), slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    for name in (".demo.abc123.tmp.safetensors", ".demo-state.x1y2.tmp", ".net.safetensors.q.tmp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".demo-step00000002-state.k3.tmp").mkdir()
    keep = [tmp_path / "demo.safetensors", tmp_path / ".hidden_by_user", tmp_path / "notes.tmp"]
    for path in keep:
        path.write_bytes(b"x")
    removed = saving.remove_stale_temps(tmp_path)
    assert len(removed) == 4
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_overwriting_an_earlier_runs_output_says_so(tmp_path, capsys):
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.written = set()
    old = tmp_path / "demo.safetensors"
    old.write_bytes(b"x")
    trainer._note_overwrite(old)
    assert f"note: {old} exists" in capsys.readouterr().out
    trainer._note_overwrite(old)  # this run's own file: replaced again silently
    trainer._note_overwrite(tmp_path / "new.safetensors")
    assert capsys.readouterr().out == ""
