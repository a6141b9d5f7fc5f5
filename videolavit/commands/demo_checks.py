"""The demo's learning checks and generation settings, read from ``experiments/tiny/demo/checks.yaml``.

Pass rules and tuned sampling flags are data beside the tiny configs they judge: retuning a stage and its
rule is one edit in one place, and the file ships with the configs, so an installed package judges the same
way a checkout does. Parsing is strict: an unknown key or a malformed rule is a :class:`DemoChecksError`
naming the file, not a check that silently never fails.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from videolavit.experiment_configs import experiments_dir, tiny_config

OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


class DemoChecksError(ValueError):
    """The demo's checks file is missing a key, has an unknown one, or holds a rule that cannot be read."""


@dataclass(frozen=True)
class Rule:
    """``value <op> bound`` where bound is a number, or ``factor * baseline`` (``baseline`` alone: factor 1)."""

    text: str

    def __post_init__(self):
        op, _, bound = self.text.strip().partition(" ")
        if op not in OPERATORS or not bound:
            raise DemoChecksError(f"rule {self.text!r}: expected '<op> <number>' or '<op> [<factor> *] baseline' "
                                  f"with op one of {list(OPERATORS)}")
        try:
            self.bound(1.0)
        except ValueError:
            raise DemoChecksError(f"rule {self.text!r}: the bound is neither a number nor [<factor> *] baseline") \
                from None

    @property
    def uses_baseline(self) -> bool:
        return self.text.strip().endswith("baseline")

    def bound(self, baseline: float | None) -> float | None:
        _, _, bound = self.text.strip().partition(" ")
        if not self.uses_baseline:
            return float(bound)
        if baseline is None:
            return None
        factor = bound.rpartition("baseline")[0].strip().rstrip("*").strip()
        return (float(factor) if factor else 1.0) * baseline

    def passes(self, value: float | None, baseline: float | None = None) -> bool:
        """False when the value (or a needed baseline) is missing."""
        bound = self.bound(baseline)
        if value is None or bound is None:
            return False
        return OPERATORS[self.text.strip().partition(" ")[0]](value, bound)


def passes(rule: str, value: float | None, baseline: float | None) -> bool:
    """``Rule(rule).passes(value, baseline)``."""
    return Rule(rule).passes(value, baseline)


@dataclass(frozen=True)
class Stage:
    name: str  # the tiny config's name and its TensorBoard log directory under runs/tiny
    export: str  # what it leaves in runs/tiny/exports (a file or directory); checked to exist
    check: str = ""  # what its learning check compares
    metric: str | None = None  # the logged scalar checked
    passes: str = ""  # a Rule's text
    baseline: str | None = None  # "before": the metric of the same config validated untrained
    baseline_metric: str | None = None  # or another scalar the same run logs (e.g. a control condition)
    smoke: list[str] = field(default_factory=list)  # extra overrides in --smoke

    @property
    def config(self) -> Path:
        return tiny_config(self.name)


@dataclass(frozen=True)
class TextToVideoChecks:
    prompts: int
    steps: int
    sampling: list[str]
    frames_shown: int
    passes: dict[str, str]  # attribute (direction, color, shape) -> rule


@dataclass(frozen=True)
class DemoChecks:
    stages: list[Stage]
    smoke_steps: list[str]
    question_answering: str  # the rule every attribute's accuracy must pass
    text_to_video: TextToVideoChecks


def _fields(section: str, data, allowed: set[str], required: set[str], path: Path) -> dict:
    if not isinstance(data, dict):
        raise DemoChecksError(f"{path}: {section} must be a mapping, got {type(data).__name__}")
    unknown, missing = set(data) - allowed, required - set(data)
    if unknown or missing:
        raise DemoChecksError(f"{path}: {section}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return data


def _strings(section: str, values, path: Path) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise DemoChecksError(f"{path}: {section} must be a list of strings (quote numbers), got {values!r}")
    return values


def load_demo_checks(path: str | Path | None = None) -> DemoChecks:
    """Read and validate the checks file (default: the one beside the tiny configs)."""
    path = Path(path) if path is not None else experiments_dir() / "tiny" / "demo" / "checks.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DemoChecksError(f"cannot read the demo's checks {path}: {error}") from None
    top = _fields("the file", data, {"stages", "smoke_steps", "question_answering", "text_to_video"},
                  {"stages", "smoke_steps", "question_answering", "text_to_video"}, path)
    stage_keys = {f for f in Stage.__dataclass_fields__}
    stages = []
    for index, entry in enumerate(top["stages"] or []):
        entry = _fields(f"stages[{index}]", entry, stage_keys, {"name", "export"}, path)
        stage = Stage(**{**entry, "smoke": _strings(f"stages[{index}].smoke", entry.get("smoke", []), path)})
        if stage.metric and not stage.passes:
            raise DemoChecksError(f"{path}: stage {stage.name} has a metric but no pass rule")
        if stage.passes:
            rule = Rule(stage.passes)
            if rule.uses_baseline and not (stage.baseline or stage.baseline_metric):
                raise DemoChecksError(f"{path}: stage {stage.name}'s rule needs a baseline or baseline_metric")
        if stage.baseline not in (None, "before"):
            raise DemoChecksError(f"{path}: stage {stage.name}: baseline must be 'before', got {stage.baseline!r}")
        stages.append(stage)
    qa = _fields("question_answering", top["question_answering"], {"passes"}, {"passes"}, path)
    t2v = _fields("text_to_video", top["text_to_video"], {"prompts", "steps", "sampling", "frames_shown", "passes"},
                  {"prompts", "steps", "sampling", "frames_shown", "passes"}, path)
    goals = _fields("text_to_video.passes", t2v["passes"], {"direction", "color", "shape"},
                    {"direction", "color", "shape"}, path)
    for rule in [qa["passes"], *goals.values()]:
        if Rule(rule).uses_baseline:
            raise DemoChecksError(f"{path}: rule {rule!r} has no baseline to compare with")
    return DemoChecks(stages=stages, smoke_steps=_strings("smoke_steps", top["smoke_steps"], path),
                      question_answering=qa["passes"],
                      text_to_video=TextToVideoChecks(prompts=int(t2v["prompts"]), steps=int(t2v["steps"]),
                                                      sampling=_strings("text_to_video.sampling", t2v["sampling"],
                                                                        path),
                                                      frames_shown=int(t2v["frames_shown"]), passes=dict(goals)))
