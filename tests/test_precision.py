"""engine.precision: the objective under autocast to a half type."""

import pytest
import torch

from gradinv.attack.inversion import invert, pixel_box, refuse_non_finite
from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine.policy import StepPlan, attacker_model, explicit_bn_double_backward, seed_runner
from gradinv.engine.seed_step import SeedStep
from gradinv.errors import UserError
from gradinv.pipeline.config import build_section

SEEDS = 2


def _gradients(attack, precision: str, per_chunk: int, workers: int):
    """One step's image gradients and loss terms of SEEDS seeds from the same start, in `precision`,
    seeds batched `per_chunk` at a time (1: one by one, on `workers` threads)."""
    model, _, artifact, images, labels = attack
    config = build_section("inversion", {"seeds": SEEDS})
    engine = build_section("engine", {"device": "cpu", "precision": precision})
    cpu = torch.device("cpu")
    objectives = [Objective(attacker_model(train_mode_copy(model), engine, cpu, SEEDS), artifact, labels, config)
                  for _ in range(SEEDS)]
    start = torch.randn((SEEDS, *images.shape), generator=torch.Generator().manual_seed(0))
    step = SeedStep(objectives, start, config, engine, pixel_box(artifact.meta["mean"], artifact.meta["std"], "cpu"),
                    StepPlan(cpu, per_chunk, workers, False, shrink_if_out_of_memory=False))
    step.fill(config.lr, [(0, 0, False)] * SEEDS)
    with seed_runner(workers) as run_seeds:
        terms = step._gradients(None, run_seeds)
    return step.images.grad.clone(), terms


@pytest.mark.parametrize("per_chunk, workers", [(1, 2), pytest.param(SEEDS, 1, marks=pytest.mark.slow)],
                         ids=["seeds on threads", "seeds vmapped"])
def test_half_precision_reaches_every_seed_on_every_path_and_the_terms_come_back_in_float32(attack, per_chunk, workers):
    exact, _ = _gradients(attack, "float32", per_chunk, workers)
    again, _ = _gradients(attack, "float32", per_chunk, workers)
    half, half_terms = _gradients(attack, "bfloat16", per_chunk, workers)
    assert all(t.dtype == torch.float32 and t.shape == (SEEDS,) for t in half_terms.values())
    for g in range(SEEDS):  # autocast is per thread: each seed's gradient must have run under it
        noise = ((again[g] - exact[g]).norm() / exact[g].norm()).item()
        apart = ((half[g] - exact[g]).norm() / exact[g].norm()).item()
        assert noise < 1e-4 and not apart <= 100 * noise + 1e-3  # far off, or not finite: either way not float32's


def test_half_precision_takes_the_explicit_batchnorm_and_refuses_pytorchs_under_vmap():
    half = build_section("engine", {"precision": "float16"})
    assert explicit_bn_double_backward(half, torch.device("cpu"), 1)
    assert not explicit_bn_double_backward(build_section("engine", {}), torch.device("cpu"), 1)
    with pytest.raises(UserError, match="'engine.precision' float16 cannot run PyTorch's BatchNorm with the seeds batched"):
        build_section("engine", {"precision": "float16", "bn_double_backward": "pytorch"})
    build_section("engine", {"precision": "float16", "bn_double_backward": "pytorch", "seed_batch": 1})
    with pytest.raises(UserError, match="'engine.precision' must be"):
        build_section("engine", {"precision": "float64"})
    with pytest.raises(UserError, match="unknown key 'inversion.precision'"):
        build_section("inversion", {"precision": "float16"})


def test_a_non_finite_loss_term_stops_the_inversion_in_one_sentence_naming_its_cause():
    values = {k: [1.0, 2.0] for k in LOSS_TERMS}
    refuse_non_finite(values, 25, build_section("engine", {}))  # finite: nothing to say
    values["grad"][1] = float("nan")
    with pytest.raises(UserError, match=r"non-finite at iteration 25 \(seed 1, term 'grad'\) under engine.precision "
                                        r"bfloat16, whose range or rounding it exceeded; use float32\.$"):
        refuse_non_finite(values, 25, build_section("engine", {"precision": "bfloat16"}))
    values["grad"][1] = float("inf")
    with pytest.raises(UserError, match=r"\(seed 1, term 'grad'\); lower inversion.lr, or check the gradient file\.$"):
        refuse_non_finite(values, 25, build_section("engine", {}))


def _spoiled_run_then_resumed(attack, tmp_path, monkeypatch, log_every: int, spoiled_call: int, spoil, stops: str):
    """An 8-iteration run checkpointed every 2 iterations whose `spoiled_call`-th step (and every
    later one) is spoiled by spoil(step, terms), which must stop it with the message `stops`; then
    the same run resumed with honest steps. Returns (steps taken by both runs, the resumed result)."""
    model, _, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 8, "seeds": SEEDS, "log_every": log_every,
                                         "registration": "none", "checkpoint_every": 2})
    engine = build_section("engine", {"device": "cpu"})
    honest, calls = SeedStep.step, []

    def spoiled(self, *args):
        calls.append(1)
        terms = honest(self, *args)
        if len(calls) >= spoiled_call:
            spoil(self, terms)
        return terms

    monkeypatch.setattr(SeedStep, "step", spoiled)
    checkpoint = tmp_path / "run.safetensors"
    with pytest.raises(UserError, match=stops):
        invert(model, artifact, labels.tolist(), config, None, checkpoint, "key", engine)
    assert len(calls) == spoiled_call  # stopped at once
    monkeypatch.setattr(SeedStep, "step", lambda self, *args: (calls.append(1), honest(self, *args))[1])
    resumed = invert(model, artifact, labels.tolist(), config, None, checkpoint, "key", engine)
    return len(calls), resumed


@pytest.mark.slow
def test_an_inversion_whose_objective_turns_non_finite_stops_there_and_keeps_its_last_checkpoint(attack, tmp_path, monkeypatch):
    def overflowed(step, terms):  # as bfloat16 does on this 16 px model from some random starts (both BatchNorms)
        terms["grad"] = torch.full_like(terms["grad"], float("inf"))

    steps, resumed = _spoiled_run_then_resumed(
        attack, tmp_path, monkeypatch, 1, 5, overflowed,
        r"non-finite at iteration 4 \(seed 0, term 'grad'\); lower inversion.lr")
    # the checkpoint written after iteration 3 was left whole: the run goes on from iteration 4
    assert steps == 5 + 4 and sorted({row["iteration"] for row in resumed.log}) == list(range(8))


@pytest.mark.slow
def test_images_gone_non_finite_between_logged_iterations_never_overwrite_the_last_checkpoint(attack, tmp_path, monkeypatch):
    def nan_pixel(step, terms):
        with torch.no_grad():
            step.images[1, 0, 0, 0, 0] = float("nan")

    # iteration 3 is not logged (log_every 8); its state was due as the checkpoint of iteration 4
    steps, resumed = _spoiled_run_then_resumed(
        attack, tmp_path, monkeypatch, 8, 4, nan_pixel,
        r"images became non-finite before iteration 4 \(seed 1\); lower inversion.lr, or check the gradient file; "
        r"the last checkpoint was kept\.")
    # resumed from the checkpoint of iteration 2 (iterations 2-7 taken again), to finite images
    assert steps == 4 + 6 and torch.isfinite(resumed.images).all()

