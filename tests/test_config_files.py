"""Configs written as a delta of base files (``base:``): the merge rules, the named errors for a missing,
broken or cyclic base, and that ``fit --config DELTA`` runs the merged settings through the CLI users run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from videolavit.__main__ import main
from videolavit.config_files import ConfigBaseError, has_bases, merge_config, read_config

REPO = Path(__file__).resolve().parents[1]
MC = "lightning.pytorch.callbacks.ModelCheckpoint"
LRM = "lightning.pytorch.callbacks.LearningRateMonitor"


def write(path: Path, config: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def test_mappings_merge_key_by_key_and_other_values_replace():
    base = {"trainer": {"max_steps": 10, "devices": 1, "plugins": [1, 2]}, "seed_everything": 0}
    delta = {"trainer": {"max_steps": 20, "plugins": [3]}, "extra": None}
    assert merge_config(base, delta) == {"trainer": {"max_steps": 20, "devices": 1, "plugins": [3]},
                                         "seed_everything": 0, "extra": None}
    assert base == {"trainer": {"max_steps": 10, "devices": 1, "plugins": [1, 2]}, "seed_everything": 0}


def test_another_class_path_replaces_the_whole_mapping_and_the_same_one_merges_init_args():
    base = {"class_path": "a.A", "init_args": {"x": 1, "y": 2}}
    assert merge_config(base, {"class_path": "b.B", "init_args": {"z": 3}}) == {"class_path": "b.B",
                                                                               "init_args": {"z": 3}}
    assert merge_config(base, {"class_path": "a.A", "init_args": {"y": 5}}) == {"class_path": "a.A",
                                                                               "init_args": {"x": 1, "y": 5}}
    assert merge_config(base, {"init_args": {"y": 5}}) == {"class_path": "a.A", "init_args": {"x": 1, "y": 5}}


def test_callback_lists_update_the_entry_of_the_same_class_and_append_the_others_in_order():
    base = [{"class_path": MC, "init_args": {"save_last": True}}, {"class_path": LRM}]
    delta = [{"class_path": "my.Logger", "init_args": {"n": 4}},
             {"class_path": MC, "init_args": {"dirpath": "runs/x"}}]
    assert merge_config(base, delta) == [{"class_path": MC, "init_args": {"save_last": True, "dirpath": "runs/x"}},
                                         {"class_path": LRM}, {"class_path": "my.Logger", "init_args": {"n": 4}}]
    assert merge_config(base, []) == []  # an empty list replaces: no callbacks


def test_bases_apply_in_order_with_their_own_bases_relative_to_the_file_naming_them(tmp_path):
    write(tmp_path / "shared" / "root.yaml", {"a": 1, "b": 1, "c": 1})
    write(tmp_path / "shared" / "mid.yaml", {"base": "root.yaml", "b": 2})
    write(tmp_path / "other.yaml", {"c": 3, "d": 3})
    config = write(tmp_path / "stage" / "run.yaml", {"base": ["../shared/mid.yaml", "../other.yaml"], "d": 4})
    assert read_config(config) == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert has_bases(config) and not has_bases(tmp_path / "other.yaml") and not has_bases(tmp_path / "none.yaml")


@pytest.mark.parametrize("files, message", [
    ({"run.yaml": {"base": "missing.yaml"}}, r"run.yaml: `base: missing.yaml` names no file"),
    ({"run.yaml": {"base": "a.yaml"}, "a.yaml": {"base": "run.yaml"}}, r"`base: run.yaml` leads back to a config"),
    ({"run.yaml": {"base": "run.yaml"}}, r"`base: run.yaml` leads back"),
    ({"run.yaml": {"base": "a.yaml"}, "a.yaml": "[1, 2"}, r"`base: a.yaml`: .*a.yaml is not valid YAML"),
    ({"run.yaml": {"base": "a.yaml"}, "a.yaml": "- 1\n- 2\n"}, r"a.yaml holds a list, not a mapping"),
    ({"run.yaml": {"base": {"file": "a.yaml"}}}, r"`base:` must be a file path or a list of file paths"),
])
def test_a_missing_broken_or_cyclic_base_is_a_named_error(tmp_path, files, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(ConfigBaseError, match=message):
        read_config(tmp_path / "run.yaml")


def test_fit_with_a_delta_config_runs_the_merged_settings(tmp_path, capsys):
    """One ``--config`` naming a delta gives what the full file would, and command-line overrides still apply."""
    tiny = REPO / "experiments" / "tiny"
    delta = write(tmp_path / "short.yaml", {"base": str(tiny / "motion_tokenizer.yaml"),
                                            "trainer": {"max_steps": 7}})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(delta), "--trainer.val_check_interval", "5", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7 and printed["trainer"]["val_check_interval"] == 5
    assert printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "runs/tiny/motion_tokenizer/checkpoints"
    assert printed["model"]["init_args"]["tokenizer"]["num_codes"] == 256
    assert "base" not in printed


def test_fit_with_a_missing_base_is_one_line_and_exit_2(tmp_path, capsys):
    delta = write(tmp_path / "run.yaml", {"base": "nowhere.yaml", "trainer": {"max_steps": 7}})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={delta}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`base: nowhere.yaml` names no file" in err and str(delta) in err
