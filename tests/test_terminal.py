"""What the terminal says: where the outputs are, how to browse runs, what a rerun does after a
crash or Ctrl-C, and none of Prefect's routine lines."""

import logging

import pytest

from flows.command import RESUME, run_flow_command
from gradinv.evaluation.context import Tracking
from tasks.publishing import summary_markdown, where_to_look
from tasks.terminal import quiet_prefect_lifecycle
from tests.conftest import write_params


@pytest.fixture
def params(tmp_path):
    return write_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt, 130), (RuntimeError("boom"), 1)])
def test_a_crash_or_ctrl_c_says_that_a_rerun_resumes_from_the_checkpoints(params, capsys, failure, code):
    def run(args):
        raise failure

    assert run_flow_command("python -m flows.pipeline", "test", run, ["--params", str(params)]) == code
    err = capsys.readouterr().err
    assert RESUME in err and "data/.checkpoints" in err
    assert ("Traceback" in err) == (code == 1)


def test_prefects_routine_lines_are_dropped_and_everything_else_kept():
    quiet_prefect_lifecycle()
    logger = logging.getLogger("prefect.task_runs")
    record = lambda level, message: logger.makeRecord(logger.name, level, __file__, 1, message, None, None)  # noqa: E731
    assert not all(f.filter(record(logging.INFO, "Finished in state Completed()")) for f in logger.filters)
    assert not all(f.filter(record(logging.INFO, "Finished in state Cached(type=COMPLETED)")) for f in logger.filters)
    assert all(f.filter(record(logging.ERROR, "Finished in state Failed('boom')")) for f in logger.filters)
    assert all(f.filter(record(logging.INFO, "invert: done -> data/invert")) for f in logger.filters)


def test_the_last_lines_link_the_report_and_name_both_browsers(tmp_path):
    report = tmp_path / "data/eval/report.html"
    tracking = Tracking("python -m flows.pipeline", "abc123", "7")
    lines = where_to_look({"report": report}, tracking).splitlines()
    assert lines[0].split() == ["report:", report.resolve().as_uri()]
    assert "make mlflow-ui" in lines[1] and "/#/experiments/7/runs/abc123" in lines[1]
    assert "make server" in lines[2]
    markdown = summary_markdown("gradinv pipeline", {"PSNR": "12.87 dB"}, {"report": report}, tracking)
    assert "| PSNR | 12.87 dB |" in markdown and report.resolve().as_uri() in markdown


@pytest.mark.parametrize("name", ["audit", "batches", "federation", "pipeline", "sweep", "tune"])
def test_a_flows_help_describes_it_in_whole_sentences(name, capsys):
    import importlib

    module = importlib.import_module(f"flows.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    first_paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first_paragraph.endswith(".") and first_paragraph in help_text
