"""Output folders commit whole and are verified on every read (gradinv.commit, gradinv.io)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from gradinv import commit
from gradinv.client.artifacts import META_FILE, TENSOR_FILE, load_gradient
from gradinv.client.victim import load_victim
from gradinv.commit import MANIFEST, committed, recover, write_manifest
from gradinv.errors import UserError
from gradinv.io import read_json, read_tensors, write_json, write_tensors
from gradinv.pipeline.stages import GRADIENT, VICTIM


def _write_outputs(folder, value):
    write_json(folder / "a.json", {"value": value})
    write_tensors(folder / "b.safetensors", {"x": torch.full((3,), float(value))})


def _values(folder):
    return read_json(folder / "a.json", "a")["value"], read_tensors(folder / "b.safetensors", "b")["x"][0].item()


def test_a_commit_replaces_the_whole_folder_and_leaves_no_staging(tmp_path):
    out = tmp_path / "data" / "out"
    for value in (1, 2):
        with committed(out) as (staging,):
            _write_outputs(staging, value)
            assert not (out / "a.json").exists() or _values(out) == (1, 1.0)  # the old outputs, untouched
    assert _values(out) == (2, 2.0)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.safetensors", MANIFEST]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_old_outputs_and_no_staging(tmp_path):
    out = tmp_path / "out"
    with committed(out) as (staging,):
        _write_outputs(staging, 1)
    with pytest.raises(RuntimeError), committed(out) as (staging,):
        write_json(staging / "a.json", {"value": 2})
        raise RuntimeError("killed by a bug halfway")
    assert _values(out) == (1, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_several_folders_commit_together_and_a_folder_can_be_removed_with_them(tmp_path):
    (tmp_path / "c" / "stale").mkdir(parents=True)
    (tmp_path / "c" / "stale" / "old.json").write_text("{}")
    with committed(tmp_path / "a", tmp_path / "c" / "b", removing=(tmp_path / "c" / "stale",)) as (a, b):
        _write_outputs(a, 1)
        _write_outputs(b, 2)
    assert _values(tmp_path / "a") == (1, 1.0) and _values(tmp_path / "c" / "b") == (2, 2.0)
    assert not (tmp_path / "c" / "stale").exists()
    assert not list(tmp_path.glob(".*")) and not list((tmp_path / "c").glob(".*"))


def test_a_commit_of_the_same_content_repairs_a_damaged_folder(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        with committed(out) as (staging,):
            _write_outputs(staging, 1)
        (out / "b.safetensors").unlink()
    with committed(out) as (staging,):
        _write_outputs(staging, 1)
    assert _values(out) == (1, 1.0)


def test_without_rename_exchange_the_commit_still_replaces_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "_rename_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for value in (1, 2):
        with committed(out) as (staging,):
            _write_outputs(staging, value)
    assert _values(out) == (2, 2.0) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_recovery_completes_a_decided_commit_and_drops_an_undecided_one(tmp_path):
    out = tmp_path / "out"
    with committed(out) as (staging,):
        _write_outputs(staging, 1)
    dead = _dead_pid()
    # A writer killed after deciding its commit (journal written) but before the exchange.
    decided = tmp_path / f".out.{dead}-aaaa.staging"
    decided.mkdir()
    _write_outputs(decided, 2)
    write_manifest(decided)
    (tmp_path / f".{dead}-aaaa.commit.json").write_text(json.dumps(
        {"folders": ["out"], "inodes": [decided.stat().st_ino], "removing": [], "token": f"{dead}-aaaa"}))
    # A writer killed while still writing: no journal, so its staging folder is dropped.
    undecided = tmp_path / f".out.{dead}-bbbb.staging"
    undecided.mkdir()
    _write_outputs(undecided, 3)
    # A writer that still runs (this process) keeps its staging folder.
    running = tmp_path / f".out.{os.getpid()}-cccc.staging"
    running.mkdir()
    recover(tmp_path)
    assert _values(out) == (2, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out"]


def test_a_reader_completes_a_pending_commit_before_it_reads(tmp_path):
    out = tmp_path / "out"
    with committed(out) as (staging,):
        _write_outputs(staging, 1)
    dead = _dead_pid()
    decided = tmp_path / f".out.{dead}-dddd.staging"
    decided.mkdir()
    _write_outputs(decided, 2)
    write_manifest(decided)
    (tmp_path / f".{dead}-dddd.commit.json").write_text(json.dumps(
        {"folders": ["out"], "inodes": [decided.stat().st_ino], "token": f"{dead}-dddd"}))
    assert _values(out) == (2, 2.0)


def test_outputs_are_readable_by_others(tmp_path):
    with committed(tmp_path / "out") as (staging,):
        _write_outputs(staging, 1)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(commit.Path, "mkdir", refuse)
    worked = []
    with pytest.raises(UserError, match="may not write to .*make the folder writable"):
        with committed(tmp_path / "out"):
            worked.append(True)
    assert not worked


def test_a_full_disk_is_one_sentence_and_keeps_the_old_outputs(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    out = tmp_path / "out"
    with committed(out) as (staging,):
        _write_outputs(staging, 1)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(UserError, match="is full; free some space"), committed(out) as (staging,):
        _write_outputs(staging, 2)
    assert _values(out) == (1, 1.0) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").write_text('{"value": 1}')
    with pytest.raises(UserError, match="without manifest.json"):
        read_json(tmp_path / "out" / "a.json", "a")


@pytest.fixture
def shared_copy(tiny_project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(tiny_project / "data", root / "data")
    return root


def test_a_byte_flipped_inside_a_tensor_is_refused(shared_copy):
    path = shared_copy / GRADIENT / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: the value stays finite, the file stays readable
    path.write_bytes(bytes(data))
    read_tensors(path, "gradient file", verify=False)  # still a valid safetensors file
    with pytest.raises(UserError, match="does not match the checksum"):
        load_gradient(shared_copy / GRADIENT, load_victim(shared_copy / VICTIM)[0])


def test_a_changed_batch_size_is_refused(shared_copy):
    path = shared_copy / GRADIENT / META_FILE
    meta = json.loads(path.read_text())
    meta["batch_size"] //= 2
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="gradient metadata .* does not match the checksum"):
        load_gradient(shared_copy / GRADIENT, load_victim(shared_copy / VICTIM)[0])


def test_an_unwritable_output_folder_stops_invert_before_the_inversion(shared_copy, monkeypatch, capsys):
    from gradinv.attack import inversion
    from gradinv.pipeline.cli import main
    from tests.conftest import write_params

    mkdir = commit.Path.mkdir

    def refuse_staging(self, *args, **kwargs):
        if self.name.endswith(".staging"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(commit.Path, "mkdir", refuse_staging)
    monkeypatch.setattr(inversion, "invert", lambda *a, **k: pytest.fail("the inversion ran"))
    before = commit.file_digest(shared_copy / "data/invert/invert.json")
    code = main(["--params", str(write_params(shared_copy / "params.yaml")), "--root", str(shared_copy), "invert"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "may not write to" in err[0]
    assert commit.file_digest(shared_copy / "data/invert/invert.json") == before


def test_a_full_disk_during_train_exits_2_and_keeps_the_old_victim(shared_copy, monkeypatch, capsys):
    from safetensors import SafetensorError

    from gradinv.pipeline.cli import main
    from tests.conftest import write_params

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    params = write_params(shared_copy / "params.yaml", {"victim": {"epochs": 0}})
    monkeypatch.setattr("safetensors.torch.save_file", full)
    before = commit.file_digest(shared_copy / VICTIM / "model.safetensors")
    assert main(["--params", str(params), "--root", str(shared_copy), "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is full; free some space" in err[0]
    assert commit.file_digest(shared_copy / VICTIM / "model.safetensors") == before
    assert load_victim(shared_copy / VICTIM)  # still the complete old victim
