"""gradinv.engine.seed_step: one iteration of all seeds, and what it does when the GPU runs out of memory."""

import pytest
import torch

from gradinv.attack.inversion import pixel_box
from gradinv.attack.objective import Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine.policy import StepPlan
from gradinv.engine.seed_step import SeedStep
from gradinv.errors import UserError
from gradinv.pipeline.config import build_section

SEEDS = 4


def _seed_step(attack, per_chunk: int, fewer_seeds_if_out_of_memory: bool, most_seeds_that_fit: int | None):
    """A step of SEEDS seeds on the tiny victim whose batched calls of more than `most_seeds_that_fit`
    seeds (and, with None, none at all) raise CUDA's out-of-memory error before they compute anything."""
    model, _, artifact, images, labels = attack
    config = build_section("inversion", {"seeds": SEEDS, "jitter": 1, "flip": True})
    objective = Objective(train_mode_copy(model), artifact, labels, config)
    start = torch.randn((SEEDS, *images.shape), generator=torch.Generator().manual_seed(0))
    plan = StepPlan(torch.device("cpu"), per_chunk, 1, False, shrink_if_out_of_memory=fewer_seeds_if_out_of_memory)
    step = SeedStep([objective] * SEEDS, start, config, build_section("engine", {"device": "cpu"}),
                    pixel_box(artifact.meta["mean"], artifact.meta["std"], "cpu"), plan)
    step.fill(config.lr, [(1, 0, True), (0, 1, False), (0, 0, False), (1, 1, True)])
    chunk_gradient, seed_gradient = step._chunk_gradient, step._seed_gradient

    def out_of_memory_above(limit, compute):
        def call(seeds, consensus):
            size = seeds.stop - seeds.start if isinstance(seeds, slice) else 1
            if limit is None or size > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return compute(seeds, consensus)
        return call

    step._chunk_gradient = out_of_memory_above(most_seeds_that_fit, chunk_gradient)
    step._seed_gradient = out_of_memory_above(most_seeds_that_fit, seed_gradient)
    return step


def _run_seeds(fn, seeds):
    return [fn(g) for g in seeds]


def test_out_of_gpu_memory_under_auto_halves_the_seeds_per_call_and_takes_the_same_step(attack, capsys):
    shrunk = _seed_step(attack, SEEDS, fewer_seeds_if_out_of_memory=True, most_seeds_that_fit=1)
    start = shrunk.images.detach().clone()
    terms = shrunk.step(False, _run_seeds)
    assert not torch.equal(shrunk.images, start)  # the step was taken
    assert shrunk.seeds_per_chunk == 1 and len(shrunk.chunks) == SEEDS
    warnings = capsys.readouterr().err.splitlines()
    assert [line.split("; ")[1] for line in warnings] == ["2 from now on (engine.seed_batch: auto).",
                                                          "1 from now on (engine.seed_batch: auto)."]
    assert all("out of GPU memory with" in line for line in warnings)

    reference = _seed_step(attack, SEEDS, fewer_seeds_if_out_of_memory=False, most_seeds_that_fit=SEEDS)
    reference._chunk_seeds(1)  # vmapped calls of one seed, as the shrunk step ends with
    expected = reference.step(False, _run_seeds)
    assert torch.equal(shrunk.images, reference.images)
    assert all(torch.equal(terms[k], expected[k]) for k in terms)


@pytest.mark.parametrize("per_chunk, fewer, message", [
    (2, False, "out of GPU memory with 2 seeds per batched call .*set engine.seed_batch lower"),
    (1, True, "out of GPU memory with one seed at a time .*needs a GPU with more memory"),
], ids=["seed_batch set", "one seed at a time"])
def test_out_of_gpu_memory_that_fewer_seeds_cannot_mend_stops_in_one_sentence(attack, per_chunk, fewer, message):
    step = _seed_step(attack, per_chunk, fewer_seeds_if_out_of_memory=fewer, most_seeds_that_fit=None)
    before = step.images.detach().clone()
    with pytest.raises(UserError, match=message):
        step.step(False, _run_seeds)
    assert torch.equal(step.images, before)  # no update from a step that failed


def test_invert_lets_only_auto_seed_batch_shrink(attack, monkeypatch):
    from gradinv.attack import inversion

    seen = []

    class Recording(SeedStep):
        def __init__(self, objectives, images, config, engine, box, plan):
            seen.append(plan.shrink_if_out_of_memory)
            super().__init__(objectives, images, config, engine, box, plan)

    monkeypatch.setattr(inversion, "SeedStep", Recording)
    model, _, artifact, _, labels = attack
    for seed_batch in (0, 2):
        config = build_section("inversion", {"iterations": 1, "seeds": 2})
        engine = build_section("engine", {"device": "cpu", "seed_batch": seed_batch})
        inversion.invert(model, artifact, labels.tolist(), config, engine=engine)
    assert seen == [True, False]
