"""The demo's pass rules and generation settings are data (experiments/tiny/demo/checks.yaml): the shipped file
loads, every stage it names has a tiny config, and a broken file is a named error, not a check that never fails."""

from __future__ import annotations

import pytest
import yaml

from videolavit.commands.demo_checks import DemoChecksError, Rule, load_demo_checks
from videolavit.experiment_configs import experiments_dir

SHIPPED = experiments_dir() / "tiny" / "demo" / "checks.yaml"


def test_the_shipped_checks_load_and_name_existing_configs():
    checks = load_demo_checks()
    names = [stage.name for stage in checks.stages]
    assert names == ["motion_tokenizer", "vision_backbone", "keyframe_tokenizer", "keyframe_detokenizer",
                     "video_detokenizer", "pretrain", "instruct"]
    for stage in checks.stages:
        assert stage.config.is_file(), stage.config
    assert Rule(checks.question_answering).passes(0.95) and not Rule(checks.question_answering).passes(0.5)
    assert set(checks.text_to_video.passes) == {"direction", "color", "shape"}
    assert checks.text_to_video.prompts >= 16  # the floor for every figure
    assert "--temperature" in checks.text_to_video.sampling


def test_rules_read_numbers_and_baselines():
    assert Rule("<= 0.30").passes(0.3) and not Rule("< 0.30").passes(0.3)
    assert Rule("< 0.95 * baseline").bound(2.0) == pytest.approx(1.9)
    assert Rule("> baseline").bound(2.0) == 2.0 and Rule("> baseline").bound(None) is None
    for bad in ("about 0.3", "<= ", "=> 0.3", "< half * baseline"):
        with pytest.raises(DemoChecksError, match="rule"):
            Rule(bad)


def _write(tmp_path, change):
    data = yaml.safe_load(SHIPPED.read_text())
    change(data)
    path = tmp_path / "checks.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda d: d["stages"][0].update(threshold=0.3), r"stages\[0\]: unknown keys \['threshold'\]"),
    (lambda d: d["stages"][0].pop("export"), r"missing keys \['export'\]"),
    (lambda d: d["stages"][0].update(passes="< baseline"), "needs a baseline"),
    (lambda d: d["stages"][0].update(passes="lower is better"), "rule 'lower is better'"),
    (lambda d: d["stages"][0].update(smoke=["--x", 8]), "list of strings"),
    (lambda d: d["text_to_video"]["passes"].pop("shape"), r"missing keys \['shape'\]"),
    (lambda d: d["question_answering"].update(passes=">= baseline"), "no baseline"),
    (lambda d: d.pop("smoke_steps"), r"missing keys \['smoke_steps'\]"),
])
def test_a_broken_checks_file_is_a_named_error(tmp_path, change, message):
    with pytest.raises(DemoChecksError, match=message):
        load_demo_checks(_write(tmp_path, change))


def test_a_missing_or_unreadable_file_is_a_named_error(tmp_path):
    with pytest.raises(DemoChecksError, match="cannot read"):
        load_demo_checks(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    with pytest.raises(DemoChecksError, match="cannot read"):
        load_demo_checks(tmp_path / "bad.yaml")
