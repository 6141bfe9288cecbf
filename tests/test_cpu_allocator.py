"""gradinv.engine.cpu_allocator: freed tensor memory is reused instead of faulted in again, and invert
asks for it on a CPU only when `engine.keep_freed_memory` is on."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gradinv.attack import inversion
from gradinv.engine import policy
from gradinv.pipeline.config import build_section

FAULTS_OF_A_SECOND_ALLOCATION = """
import resource, sys, torch
from gradinv.engine.cpu_allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
for megabytes in (24, 20):  # the second smaller: a block aligned anew needs some slack in the freed one
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(megabytes * 2**20 // 4).fill_(1.0)  # every page touched
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del block
print(applied, faults / (megabytes * 2**20 // resource.getpagesize()))
"""


def _second_allocation(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_ALLOCATION, mode], capture_output=True, text=True, check=True)
    applied, share = out.stdout.split()
    return applied == "True", float(share)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    applied, kept = _second_allocation("keep")
    _, default = _second_allocation("default")
    assert applied
    assert kept < 0.1  # the 24 MB freed by the first cycle, reused
    assert default > 0.5  # glibc's default gave them back: the second cycle faulted them in


@pytest.mark.parametrize("keep", [True, False])
def test_invert_keeps_freed_memory_on_a_cpu_only_when_asked(attack, monkeypatch, keep):
    model, _, artifact, _, labels = attack
    calls = []
    monkeypatch.setattr(policy, "keep_freed_memory", lambda: calls.append(True))
    config = build_section("inversion", {"iterations": 1, "seeds": 1})
    engine = build_section("engine", {"device": "cpu", "keep_freed_memory": keep})
    inversion.invert(model, artifact, sorted(labels.tolist()), config, engine=engine)
    assert bool(calls) is keep


def test_keep_freed_memory_must_be_a_boolean():
    from gradinv.errors import UserError

    with pytest.raises(UserError, match="engine.keep_freed_memory"):
        build_section("engine", {"keep_freed_memory": "yes"})
