"""The engine's step as data for CUDA graphs: index views, the graph wrapper's warm-up and
recapture, checkpoints of the stacked seeds."""

import pytest
import torch

from gradinv.attack.views import apply_views, draw_view, view_indices
from gradinv.engine.cuda_graph import WARMUP_CALLS, GraphedStep
from gradinv.errors import UserError
from gradinv.pipeline.config import build_section


def test_index_views_are_the_shift_then_flip_and_pass_gradients_back_to_their_pixels():
    config = build_section("inversion", {"jitter": 3, "flip": True})
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(6, 2, 3, 7, 9, generator=generator, requires_grad=True)
    views = [draw_view(config, generator) for _ in range(6)]
    assert len(set(views)) > 1 and {flip for _, _, flip in views} == {True, False}
    rows, cols = view_indices(views, 7, 9)
    seen = apply_views(xs, rows, cols)
    for g, (down, right, flip) in enumerate(views):
        expected = torch.roll(xs[g], shifts=(down, right), dims=(-2, -1))
        assert torch.equal(seen[g], expected.flip(-1) if flip else expected)
    weights = torch.randn(seen.shape, generator=generator)
    (grad,) = torch.autograd.grad((seen * weights).sum(), xs)
    for g, (down, right, flip) in enumerate(views):  # a permutation: each pixel gets its view pixel's weight
        back = weights[g].flip(-1) if flip else weights[g]
        assert torch.equal(grad[g], torch.roll(back, shifts=(-down, -right), dims=(-2, -1)))


def test_views_without_jitter_or_flip_are_the_identity():
    config = build_section("inversion", {})
    view = draw_view(config, torch.Generator().manual_seed(0))
    assert view == (0, 0, False)
    xs = torch.randn(2, 1, 3, 4, 5)
    assert torch.equal(apply_views(xs, *view_indices([view] * 2, 4, 5)), xs)


def test_graphed_step_warms_up_eagerly_then_replays_one_capture_per_kind():
    calls, captures = [], []

    def step(kind):
        calls.append(kind)
        return {"kind": kind}

    def fake_capture(fn, device):
        captures.append(fn())  # capture runs the step once, as recording does
        return lambda: {"replayed": captures[-1]["kind"]}

    run = GraphedStep(step, torch.device("cpu"), capture=fake_capture)
    outputs = [run(False) for _ in range(WARMUP_CALLS + 3)]
    assert outputs[:WARMUP_CALLS] == [{"kind": False}] * WARMUP_CALLS
    assert outputs[WARMUP_CALLS:] == [{"replayed": False}] * 3
    assert len(captures) == 1 and calls == [False] * (WARMUP_CALLS + 1)
    later = [run(True) for _ in range(WARMUP_CALLS + 2)]  # the consensus appears: warm up and capture again
    assert later == [{"kind": True}] * WARMUP_CALLS + [{"replayed": True}] * 2
    assert len(captures) == 2


def test_a_step_that_cannot_be_captured_is_reported_in_one_sentence():
    def failing_capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    run = GraphedStep(lambda kind: {}, torch.device("cpu"), capture=failing_capture)
    for _ in range(WARMUP_CALLS):
        run(False)
    with pytest.raises(UserError, match=r"could not be captured as a CUDA graph \(operation not permitted when stream "
                                        r"is capturing\); set engine.cuda_graph: false\.$"):
        run(False)


def test_under_auto_a_step_that_cannot_be_captured_warns_once_and_runs_eagerly(capsys):
    calls, captures = [], []

    def failing_capture(fn, device):
        captures.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    def step(kind):
        calls.append(kind)
        return {"call": len(calls)}

    run = GraphedStep(step, torch.device("cpu"), capture=failing_capture, eager_if_uncapturable=True)
    results = [run(False) for _ in range(WARMUP_CALLS + 3)]
    assert [r["call"] for r in results] == list(range(1, WARMUP_CALLS + 4))  # every call ran the step itself
    assert len(captures) == 1
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "could not be captured as a CUDA graph" in err and "runs eagerly" in err


@pytest.mark.slow
def test_cuda_graph_setting_is_checked_and_is_a_no_op_off_cuda(attack):
    from gradinv.attack.inversion import invert

    for wrong in ("yes", 1):
        with pytest.raises(UserError, match="engine.cuda_graph"):
            build_section("engine", {"cuda_graph": wrong})
    with pytest.raises(UserError, match="unknown key 'inversion.cuda_graph'"):  # a speed setting: engine's
        build_section("inversion", {"cuda_graph": True})
    model, _, artifact, _, labels = attack
    labels = sorted(labels.tolist())
    config = build_section("inversion", {"iterations": 4, "seeds": 2, "warmup": 1, "langevin": 0.2, "jitter": 1, "flip": True})
    plain = invert(model, artifact, labels, config, engine=build_section("engine", {"device": "cpu"}))
    graphed = invert(model, artifact, labels, config, engine=build_section("engine", {"device": "cpu", "cuda_graph": True}))
    assert torch.equal(plain.images, graphed.images)


def test_cuda_graph_auto_graphs_wherever_the_graphed_step_can_run(monkeypatch):
    from gradinv.engine import policy

    monkeypatch.setattr(policy, "resolve_device", torch.device)  # "cuda" without a GPU
    graphed = lambda values, fedavg=False: policy.plan_step(build_section("engine", values), 4, 8, fedavg).graphed  # noqa: E731
    auto = build_section("engine", {})
    assert auto.cuda_graph == "auto" and graphed({"device": "cuda"})
    assert not graphed({"device": "cpu"}) and not graphed({"device": "cuda"}, fedavg=True)
    assert not graphed({"device": "cuda", "cuda_graph": False})
    assert graphed({"device": "cuda", "cuda_graph": True}) and not graphed({"device": "cpu", "cuda_graph": True})
    assert policy.plan_step(build_section("engine", {"device": "cuda", "seed_batch": 1}), 4, 8, False).workers == 1


def test_bn_double_backward_auto_is_explicit_on_cuda_with_several_seeds():
    from gradinv.engine.policy import explicit_bn_double_backward

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = build_section("engine", {})
    assert explicit_bn_double_backward(auto, cuda, 8)
    assert not explicit_bn_double_backward(auto, cuda, 1)
    assert not explicit_bn_double_backward(auto, cpu, 8)
    assert explicit_bn_double_backward(build_section("engine", {"bn_double_backward": "explicit"}), cpu, 1)
    assert explicit_bn_double_backward(build_section("engine", {"bn_double_backward": "explicit-fused"}), cpu, 1)
    assert not explicit_bn_double_backward(build_section("engine", {"bn_double_backward": "pytorch"}), cuda, 8)
    with pytest.raises(UserError, match="bn_double_backward"):
        build_section("engine", {"bn_double_backward": "fast"})


@pytest.mark.slow
def test_a_checkpoint_of_another_layout_is_ignored(attack, tmp_path):
    from safetensors.torch import save_file

    from gradinv.attack.inversion import invert

    model, _, artifact, _, labels = attack
    labels = sorted(labels.tolist())
    config = build_section("inversion", {"iterations": 4, "seeds": 2, "warmup": 1, "checkpoint_every": 2})
    engine = build_section("engine", {"device": "cpu"})
    fresh = invert(model, artifact, labels, config, engine=engine)
    checkpoint = tmp_path / "run.safetensors"
    # The per-seed layout of earlier versions, under the right key: never half-read, the run starts over.
    save_file({"x.0": torch.zeros(4, 3, 16, 16), "x.1": torch.zeros(4, 3, 16, 16)}, str(checkpoint),
              metadata={"key": "key", "step": "2", "seeds": "2", "log": "[]"})
    again = invert(model, artifact, labels, config, None, checkpoint, "key", engine)
    assert torch.equal(again.images, fresh.images) and again.log == fresh.log

