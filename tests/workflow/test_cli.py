import pytest

from poisonflow.cli import STAGES, main


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_help_lists_its_arguments(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: poisonflow {stage}" in out
    assert "--spec" in out or "--metrics" in out


def test_user_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    code = main(["poison", "--name", "a", "--spec", '{"kind": "badnets"}', "--seed", "0",
                 "--clean", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "p.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"poisonflow poison: error: {tmp_path / 'missing.zarr'}: store does not exist"]
