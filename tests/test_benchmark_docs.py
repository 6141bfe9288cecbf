"""benchmarks/write_docs.py: the speed docs are what the results files give, rows of retired
settings left out, and every timed step set against what was counted for it."""

import json
import shutil

import pytest

from benchmarks import write_docs
from benchmarks.common import DOCS, REPO, RESULTS
from benchmarks.write_docs import against_bound, cuda_graph_section, documents, load_results, readme_block


def test_the_docs_in_the_repository_are_what_the_results_files_give():
    for path, text in documents().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run python -m benchmarks.write_docs"


def test_the_readme_speed_table_is_what_the_results_files_give_where_readme_has_its_markers():
    readme = (REPO / "README.md").read_text()
    if write_docs.README_START not in readme:
        pytest.skip("README.md has no speed-table markers yet")
    start = readme.index(write_docs.README_START)
    end = readme.index(write_docs.README_END) + len(write_docs.README_END)
    assert readme[start:end] == readme_block(load_results()), "run python -m benchmarks.write_docs --readme"


def test_the_readme_block_replaces_what_lies_between_the_markers_only():
    block = readme_block(load_results())
    assert block.startswith(write_docs.README_START) and block.endswith(write_docs.README_END)
    text = f"# title\n\n{write_docs.README_START}\nold table\n{write_docs.README_END}\n\nrest\n"
    assert write_docs.with_readme_block(text, block) == f"# title\n\n{block}\n\nrest\n"
    assert write_docs.with_readme_block("# no markers\n", block) is None
    assert "not met" in block and "82 minutes" in block  # the paper preset's target, from cuda_graph.json


def test_the_targets_and_figures_come_from_the_results_files():
    found = load_results()
    doc = documents()[DOCS / "performance.md"]
    preset = write_docs.default_step(found["cuda_graph"], 8, 8)
    assert preset["bn_double_backward"] == "explicit" and preset["cuda_graph"]
    minutes = preset["seconds_per_iteration"] * 20000 / 60
    assert f"**{minutes:.0f} minutes**" in doc and "| not met |" in doc
    cpu = dict(write_docs.cpu_speedups(found["step_speed-cpu"]))
    rows = {(r["seeds"], r["variant"]): r["seconds_per_iteration"] for r in found["step_speed-cpu"]["rows"]}
    assert cpu[8] == rows[(8, "baseline")] / rows[(8, "engine-auto")]
    assert f"{cpu[1]:.2f}× / {cpu[4]:.2f}× / {cpu[8]:.2f}×" in doc
    assert f"{found['step_roofline']['rows'][6]['paper_minutes_H100']:.1f} min" in doc  # explicit BN at bs 8 G 8
    for retired in ("compile_check", "gpu_probes"):  # their answers stay in the doc, their files are gone
        assert f"benchmarks/{retired}.py" in doc and not (RESULTS / f"{retired}.json").exists()


def test_rows_of_settings_the_engine_no_longer_has_are_left_out_but_kept_in_their_files():
    found = load_results()
    assert any("channels-last" in r["variant"] for r in found["step_speed-cpu"]["rows"])
    assert any(r.get("batched_seeds") == "stacked" for r in found["cuda_graph"]["speed"])
    for text in documents().values():
        assert "channels-last" not in text and "channels_last |" not in text and "stacked |" not in text
        assert "stacked vs vmapped" not in text and "seeds stacked:" not in text


def test_the_doc_shows_each_suites_own_file_first_then_other_machines_with_their_note(tmp_path):
    for name in ("step_speed-gpu.json", "step_speed-cpu.json", "step_speed-cpu-second.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    doc = documents(tmp_path, tmp_path)[tmp_path / "step_speed.md"]
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("step_speed-cpu.json", "step_speed-cpu-second.json"))
    positions = [doc.index(f"Command: `{write_docs.run_now(first['command'])}`"), doc.index(second["note"]),
                 doc.index(f"Command: `{write_docs.run_now(second['command'])}`"), doc.index("### GPU")]
    assert positions == sorted(positions)
    assert "note" not in first and doc.count(second["note"]) == 1
    assert "python benchmarks/" not in doc  # recorded commands shown as they run now: python -m benchmarks.<name>


def test_a_missing_measurement_is_listed_with_its_command_until_its_results_file_exists(tmp_path):
    for name in ("cuda_graph.json", "step_speed-gpu.json"):
        shutil.copy(RESULTS / name, tmp_path / name)
    doc = documents(tmp_path, tmp_path)[tmp_path / "performance.md"]
    assert "python -m benchmarks.bn_elementwise_check`" in doc
    (tmp_path / "bn_elementwise-cuda.json").write_text("{}")
    assert "python -m benchmarks.bn_elementwise_check`" not in documents(tmp_path, tmp_path)[tmp_path / "performance.md"]


def test_a_timed_step_is_set_against_the_traffic_and_arithmetic_counted_for_its_variant():
    roofline = {"gpus": {"H100": {"bandwidth": 2e12, "tf32": 400e12}},
                "rows": [{"bn_double_backward": "explicit", "batch": 8, "seeds": 8, "bytes": 300e9, "flops": 4e12,
                          "paper_minutes_H100": 0.1 * 20000 / 60}]}
    timed = {"batch": 8, "seeds": 8, "cuda_graph": True, "bn_double_backward": "explicit", "seconds_per_iteration": 0.3}
    uncounted = [{**timed, "batched_seeds": "stacked"}, {**timed, "channels_last": True}, {**timed, "batch": 1},
                 {**timed, "precision": "float16"}, {**timed, "error": "out of GPU memory"}]
    (line,) = against_bound([timed, *uncounted, {**timed, "conv_double_backward": "explicit"}], roofline, "H100")
    assert "1.00 TB/s of the counted 300 GB (50% of the H100's 2.00 TB/s)" in line
    assert "13.3 TFLOP/s (3.3% of TF32)" in line and line.endswith("3.0x its bound")
    # a step with the convolutions written out is set against its own count, not the default's
    roofline["explicit_conv_rows"] = [{**roofline["rows"][0], "bytes": 330e9, "conv_double_backward": "explicit"},
                                      {**roofline["rows"][0], "bytes": 240e9, "conv_double_backward": "explicit-grouped"}]
    written_out = [{**timed, "conv_double_backward": mode} for mode in ("explicit", "explicit-grouped")]
    _, dense, grouped = against_bound([timed, *written_out], roofline, "H100")
    assert "BN explicit, convolutions explicit:" in dense and "of the counted 330 GB" in dense
    assert "BN explicit, convolutions explicit-grouped:" in grouped and "of the counted 240 GB" in grouped


def test_a_graphed_variant_timed_without_an_eager_twin_gets_a_line_of_its_own():
    step = {"batch": 8, "seeds": 8, "cuda_graph": True, "bn_double_backward": "explicit", "peak_memory_bytes": 2**30}
    speed = [{**step, "cuda_graph": False, "seconds_per_iteration": 0.6}, {**step, "seconds_per_iteration": 0.3},
             {**step, "cudnn_benchmark": True, "seconds_per_iteration": 0.2},
             {**step, "conv_double_backward": "explicit", "seconds_per_iteration": 0.1},
             {**step, "batched_seeds": "stacked", "seconds_per_iteration": 0.5}]  # retired: left out
    section = cuda_graph_section({"machine": {}, "command": "c", "check": {"error": "none"}, "speed": speed})
    rows = [line for line in section.splitlines() if line.startswith("| 8 | 8 |")]
    assert rows == ["| 8 | 8 | explicit | - | 0.600 | 0.300 | 2.00x | 1024 MiB / 1024 MiB |",
                    "| 8 | 8 | explicit | cudnn.benchmark | not run | 0.200 | - | - / 1024 MiB |",
                    "| 8 | 8 | explicit | convolutions explicit | not run | 0.100 | - | - / 1024 MiB |"]
    unchecked = cuda_graph_section({"machine": {}, "command": "c --skip-check", "speed": speed})  # timed only
    assert "not run by this command (--skip-check)" in unchecked and rows[2] in unchecked.splitlines()


BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmarks_help_describes_it_in_whole_sentences(name, capsys, monkeypatch):
    import importlib
    import runpy

    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr("sys.argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    first_paragraph = module.__doc__.split("\n\n")[0].strip()
    assert help_text.startswith(f"usage: python -m benchmarks.{name}")
    assert first_paragraph.endswith((".", "?", ":"))
    assert "".join(first_paragraph.split()) in "".join(help_text.split())  # argparse may wrap at hyphens
