"""A stage killed after any rename leaves its outputs old or new, never mixed, and the next run
completes with the result of an uninterrupted run (the kill comes from a test hook in
gradinv.atomic, after the N-th rename, not from timing)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal

import pytest

from gradinv.atomic import KILL_AFTER_RENAMES
from gradinv.commit import MANIFEST, recover
from gradinv.pipeline.stages import STAGES
from tests.conftest import write_params

pytestmark = pytest.mark.slow

# Settings under which each stage's outputs differ from the tiny project's.
NEW_SETTINGS = {
    "prepare": {"data": {"seed": 1}},
    "train": {"victim": {"seed": 1}},
    "capture": {"capture": {"seed": 2}},
    "labels": {"labels": {"strategy": "counts", "posterior_steps": 5}},
    "invert": {"inversion": {"seed": 1}},
    "evaluate": {"evaluation": {"registration_max_shift": 1}},
}


TIMINGS = ("seconds", "seconds_per_iteration", "finished")  # invert.json: wall-clock figures and time of day


def digest(folder) -> str | None:
    """The folder's content, without timings (and without the manifest, which hashes them)."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        data = path.read_bytes()
        if path.suffix == ".json":
            data = json.dumps({k: v for k, v in json.loads(data).items() if k not in TIMINGS}).encode()
        h.update(str(path.relative_to(folder)).encode() + data)
    return h.hexdigest()


def outputs(root, stage) -> tuple:
    return tuple(digest(root / folder) for folder in STAGES[stage].outputs)


# Every run (the reference, the killed one, the rerun) forks from one server that has imported
# gradinv but computed nothing: they share thread settings, and none pays torch's import again.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["gradinv.pipeline.cli"])


def _stage(params, root, stage, kill_after) -> None:
    from gradinv.pipeline.cli import main

    os.environ.pop(KILL_AFTER_RENAMES, None)
    if kill_after:
        os.environ[KILL_AFTER_RENAMES] = str(kill_after)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        code = main(["--params", str(params), "--root", str(root), stage])
    os._exit(code)


def run(root, params, stage, kill_after: int | None = None) -> int:
    """The stage in a process of its own, as a user's run; its exit code (-SIGKILL when killed)."""
    process = FORKS.Process(target=_stage, args=(params, root, stage, kill_after))
    process.start()
    process.join()
    return process.exitcode


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_after_any_rename_leaves_old_or_new_outputs(tiny_project, tmp_path, stage):
    params = write_params(tmp_path / "params.yaml", NEW_SETTINGS[stage])
    reference = tmp_path / "reference"
    shutil.copytree(tiny_project / "data", reference / "data")
    assert run(reference, params, stage) == 0
    old, new = outputs(tiny_project, stage), outputs(reference, stage)
    assert all(o != n for o, n in zip(old, new))

    renames, code = 0, -signal.SIGKILL
    while code == -signal.SIGKILL:
        renames += 1
        root = tmp_path / f"killed-{renames}"
        shutil.copytree(tiny_project / "data", root / "data")
        code = run(root, params, stage, kill_after=renames)
        seen = outputs(root, stage)
        assert all(s in (o, n) for s, o, n in zip(seen, old, new)), f"mixed folder after rename {renames}"
        for parent in {(root / folder).parent for folder in STAGES[stage].outputs}:
            recover(parent)  # what the next run does first
        assert outputs(root, stage) in (old, new), f"outputs of two runs after rename {renames}"
        assert run(root, params, stage) == 0
        assert outputs(root, stage) == new
        leftovers = [p.name for p in (root / "data").rglob(".*") if ".staging" in p.name or ".commit" in p.name]
        assert not leftovers
        shutil.rmtree(root)
    assert code == 0 and renames > 3  # files, manifests, the journal and the exchange each renamed
