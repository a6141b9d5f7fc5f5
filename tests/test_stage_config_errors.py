"""A config value a stage refuses reads as one line and exit 2, like an argument error."""

from pathlib import Path

import pytest

from videolavit.__main__ import main
from videolavit.cli import stage_config_error
from videolavit.config_errors import StageConfigError

REPO = Path(__file__).resolve().parents[1]


def test_a_refused_attention_kernel_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/tiny/pretrain.yaml",
              "--model.init_args.attn_implementation", "flash_attention_2"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: attn_implementation='flash_attention_2'")
    assert "set model.attn_implementation to one of ['sdpa', 'eager']" in errors[0]


def test_the_config_error_is_found_through_wrapping_errors():
    try:
        try:
            raise StageConfigError("set x")
        except StageConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert str(stage_config_error(outer)) == "set x"
    assert stage_config_error(ValueError("plain")) is None
