import pytest
import torch
import torch.nn.functional as F

from gradinv.attack.consensus import REGISTRATIONS, consensus, register
from gradinv.evaluation.metrics import psnr


def _smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    noise = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


@pytest.mark.parametrize("method", ["translation", "ilk", "tvl1"])
def test_registration_undoes_a_small_shift(method):
    reference = _smooth_image(0)
    moved = torch.roll(reference, shifts=(2, -1), dims=(1, 2))
    inner = (slice(None), slice(4, -4), slice(4, -4))  # away from the wrapped border
    before = psnr(moved[inner][None], reference[inner][None]).item()
    after = psnr(register(reference, moved, method)[inner][None], reference[inner][None]).item()
    assert after > before + 10


def test_consensus_of_identical_seeds_is_the_seed_and_none_is_the_mean():
    image = torch.stack([_smooth_image(1), _smooth_image(2)])
    same = image.expand(3, -1, -1, -1, -1)
    for method in REGISTRATIONS:
        assert torch.allclose(consensus(same, method), image, atol=1e-5)
    different = torch.stack([image, image.flip(-1)])
    assert torch.allclose(consensus(different, "none"), different.mean(0))


def test_registered_consensus_of_shifted_seeds_is_sharper_than_their_mean():
    truth = _smooth_image(3)[None]
    seeds = torch.stack([torch.roll(truth, shifts=(dy, dx), dims=(2, 3)) for dy, dx in [(0, 0), (2, 0), (0, -2), (-1, 1)]])
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    lazy = psnr(consensus(seeds, "none")[inner], truth[inner]).item()
    registered = psnr(consensus(seeds, "tvl1")[inner], truth[inner]).item()
    assert registered > lazy + 3


def test_the_registration_benchmark_scores_each_consensus_over_the_batches(tiny_project, tmp_path, capsys):
    import json
    import shutil

    from benchmarks import registration
    from gradinv.attack.outputs import RECONSTRUCTION_FILE
    from gradinv.client.capture import TRUTH_FILE
    from gradinv.io import read_tensors
    from gradinv.pipeline.folders import INVERT, TRUTH

    run = tmp_path / "run"
    for name in ("batch-000", "batch-001"):  # a many-batch folder's layout
        shutil.copytree(tiny_project / INVERT, run / name / "invert")
        shutil.copytree(tiny_project / TRUTH, run / name / "truth")
    out, doc = tmp_path / "registration.json", tmp_path / "registration.md"
    assert registration.main([str(run), "--out", str(out), "--doc", str(doc)]) == 0
    result = json.loads(out.read_text())
    seeds = read_tensors(run / "batch-000/invert" / RECONSTRUCTION_FILE, "reconstruction")["seeds"]
    originals = read_tensors(run / "batch-000/truth" / TRUTH_FILE, "ground truth")["images"].float() / 255
    batch = result["batches"][0]
    assert len(result["batches"]) == 2 and len(batch["seeds"]) == len(seeds) >= 2
    assert batch["consensus"]["none"] == pytest.approx(registration.mean_psnr(seeds.mean(0), originals))
    summary = result["summary"]
    assert summary["best_seed"]["mean"] == pytest.approx(max(batch["seeds"]))
    for method, row in summary["methods"].items():
        assert row["over_best_seed"]["mean"] == pytest.approx(batch["consensus"][method] - max(batch["seeds"]))
        assert f"| consensus, {method} | {row['psnr']['mean']:.2f} ± 0.00 |" in doc.read_text()
    assert "over the 2 batches of" in doc.read_text()
    assert registration.main([str(tmp_path / "empty")]) == 2
    assert "no batch-NNN folder" in capsys.readouterr().err


def test_the_registration_page_is_what_its_results_file_gives():
    import json

    from benchmarks.common import DOCS, RESULTS
    from benchmarks.registration import document

    result = json.loads((RESULTS / "registration.json").read_text())
    assert result["summary"]["batches"] >= 8
    assert (DOCS / "registration.md").read_text() == document(result)


def test_the_ablation_benchmark_changes_only_each_rows_terms(tiny_project, tmp_path):
    import json

    from benchmarks import ablation

    out, doc = tmp_path / "ablation.json", tmp_path / "ablation.md"
    argv = ["--root", str(tiny_project), "--params", str(tiny_project / "params.yaml"), "--batches", "2",
            "--iterations", "4", "--seeds", "2", "--out", str(out), "--doc", str(doc)]
    assert ablation.main(argv) == 0
    result = json.loads(out.read_text())
    configs = [row["config"] for row in result["rows"]]
    assert [row["row"] for row in result["rows"]] == list(ablation.rows(ablation.at_budget(
        ablation.load_params(tiny_project / "params.yaml")["inversion"], 4, 2)))
    assert configs[0]["alpha_bn"] == configs[0]["alpha_tv"] == configs[0]["alpha_group"] == 0.0
    assert configs[1]["alpha_bn"] > 0 and configs[1]["alpha_group"] == 0.0
    assert configs[2]["alpha_group"] == configs[3]["alpha_group"] > 0
    assert (configs[2]["registration"], configs[3]["registration"]) == ("none", "tvl1")
    for config in configs:  # nothing else differs between rows
        assert {k: v for k, v in config.items() if k not in ("alpha_tv", "alpha_l2", "alpha_bn", "alpha_group",
                                                              "registration")} == \
               {k: v for k, v in configs[0].items() if k not in ("alpha_tv", "alpha_l2", "alpha_bn", "alpha_group",
                                                                  "registration")}
        assert config["langevin"] == 0.0 and config["iterations"] == 4 and config["seeds"] == 2
    first = result["rows"][0]
    assert len(first["chosen_psnr_per_batch"]) == 2
    assert first["chosen_psnr"]["mean"] == pytest.approx(sum(first["chosen_psnr_per_batch"]) / 2)
    assert f"| L_grad only | {first['chosen_psnr']['mean']:.2f} ± {first['chosen_psnr']['std']:.2f} |" in doc.read_text()


def test_the_ablation_page_is_what_its_results_file_gives():
    import json

    from benchmarks.ablation import document
    from benchmarks.common import DOCS, RESULTS

    result = json.loads((RESULTS / "ablation.json").read_text())
    assert result["batches"] >= 3
    assert (DOCS / "ablation.md").read_text() == document(result)
