import pytest

from gradinv.cli import main
from gradinv.config import SECTIONS, build_section, load_params
from gradinv.errors import UserError
from tests.conftest import REPO, write_params


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert set(params) == set(SECTIONS)
    assert params["inversion"].seeds == 4 and params["capture"].batch_size == 8


@pytest.mark.parametrize("section, values, fragment", [
    ("inversion", {"iterations": -5}, "'inversion.iterations' must be positive"),
    ("inversion", {"iterations": 2.5}, "'inversion.iterations' must be of type"),
    ("inversion", {"bn_prior": "maybe"}, "'inversion.bn_prior' must be one of"),
    ("inversion", {"iteratons": 10}, "unknown key 'inversion.iteratons'"),
    ("capture", {"distinct_labels": "yes"}, "'capture.distinct_labels'"),
    ("data", {"std": [0.2, 0.0, 0.2]}, "'data.std' must be positive"),
    ("data", {"source": "imagefolder"}, "'data.train_dir' and 'data.pool_dir' are required"),
])
def test_bad_values_name_the_key(section, values, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        build_section(section, values)


def test_integers_are_accepted_where_floats_are_expected():
    assert build_section("inversion", {"lr": 1}).lr == 1.0


def test_cli_rejects_bad_params_with_exit_2_and_writes_nothing(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"inversion": {"iterations": 0}})
    assert main(["--params", str(params), "--root", str(tmp_path), "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inversion.iterations" in err[0]
    assert not (tmp_path / "data").exists()


def test_missing_params_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
