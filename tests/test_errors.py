"""A stage given a bad input ends with one line that says the fix, not a traceback."""

from __future__ import annotations

import pytest

from conftest import ROOT, run, stage_command
from vlmprobe.errors import MissingInput, VlmprobeError, stage_main
from vlmprobe.params import ParamsError


def test_stage_main_prints_a_user_error_as_one_line_and_lets_bugs_through(capsys):
    def missing() -> None:
        raise MissingInput("no feature store at x. Fix: `dvc repro extract`.")

    assert stage_main(missing) == 1
    assert capsys.readouterr().err == "error: no feature store at x. Fix: `dvc repro extract`.\n"
    assert issubclass(ParamsError, VlmprobeError) and issubclass(MissingInput, FileNotFoundError)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        stage_main(lambda: 1 / 0)


@pytest.mark.parametrize("stage", ["probe", "align", "reconstruct"])
def test_a_stage_without_its_inputs_says_which_stage_to_run(tmp_path, stage):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run(stage_command(stage), tmp_path, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "`dvc repro" in last  # names the stage to run
