"""The unit plan of a ``prepare`` output directory: which inputs each unit holds.

Units are the grain of resumption and of ``--part i/N`` fan-out. A unit is defined by its content: a
loose unit by the relative paths of the files it holds (and named by their hash, so a unit name never
stands for two contents), a tar unit by the shard's path and size. The plan is stored once in
``OUT/.units/plan.json`` and every part reads it, so parts started at different times agree. When the
inputs or ``--videos-per-unit`` change, a new plan keeps every finished unit whose inputs are all still
there and groups the rest afresh: no input is left out or held by two units. A finished unit whose
inputs are gone is only redone (without them) when the user asks for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datamodules.prepare_inputs import InputError, Inputs, Unit

PLAN_FILE = "plan.json"
PLAN_VERSION = 2


class PlanError(InputError):
    """The output directory's units cannot be reconciled with these inputs without losing prepared work."""


def loose_unit(files: list[str]) -> dict:
    digest = hashlib.sha1("\n".join(files).encode("utf-8")).hexdigest()[:12]
    return {"name": f"videos-{digest}", "files": list(files)}


def tar_unit(path: str, size: int) -> dict:
    stem = path[:-len(".tar")] if path.endswith(".tar") else path
    return {"name": f"tar-{stem.replace('/', '__')}", "tar": path, "bytes": size}


def unit_inputs(unit: dict) -> int | None:
    """How many input files a unit holds (None for a tar: its samples are known once read)."""
    return len(unit["files"]) if "files" in unit else None


def read_plan(units_dir: Path) -> dict | None:
    try:
        plan = json.loads((units_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and plan.get("version") == PLAN_VERSION else None


def _planned(plan: dict) -> tuple[list[str], dict[str, int]]:
    files = [f for u in plan["units"] for f in u.get("files", [])]
    return files, {u["tar"]: u["bytes"] for u in plan["units"] if "tar" in u}


def describe_change(plan: dict, inputs: Inputs, videos_per_unit: int) -> str | None:
    """What differs between a stored plan and these inputs and settings (None: the plan still holds)."""
    files, tars = _planned(plan)
    changes = []
    added = set(inputs.loose) - set(files)
    removed = set(files) - set(inputs.loose)
    if added:
        changes.append(f"{len(added)} input file(s) added (e.g. {min(added)})")
    if removed:
        changes.append(f"{len(removed)} input file(s) removed (e.g. {min(removed)})")
    if len(files) != len(set(files)):
        changes.append("inputs planned twice")
    changed_tars = sorted(set(tars.items()) ^ set(inputs.tars.items()))
    if changed_tars:
        changes.append(f"input shards changed (e.g. {changed_tars[0][0]})")
    if plan["videos_per_unit"] != videos_per_unit:
        changes.append(f"--videos-per-unit {plan['videos_per_unit']} -> {videos_per_unit}")
    return "; ".join(changes) or None


def make_plan(inputs: Inputs, videos_per_unit: int, config: dict, finished: list[dict],
              drop_removed: bool = False) -> dict:
    """A plan over ``inputs`` that keeps the ``finished`` units (records) whose inputs are all present."""
    present, kept, covered, gone = set(inputs.loose), [], set(), []
    kept_tars: set[str] = set()
    for unit in sorted(finished, key=lambda u: u["name"]):
        if "tar" in unit:
            if inputs.tars.get(unit["tar"]) == unit["bytes"] and unit["tar"] not in kept_tars:
                kept.append(unit)
                kept_tars.add(unit["tar"])
            elif unit["tar"] not in inputs.tars:
                gone.append(unit["tar"])
            continue
        files = set(unit["files"])
        if files <= present and not files & covered:
            kept.append(unit)
            covered |= files
        elif not files <= present:
            gone.extend(sorted(files - present))
    if gone and not drop_removed:
        raise PlanError(f"the output directory holds prepared videos whose input files are gone ({len(gone)}, "
                        f"e.g. {gone[0]}); pass the original --videos, another --out, or --drop-removed to redo "
                        "those units without them")
    rest = [f for f in inputs.loose if f not in covered]
    loose = [u for u in kept if "files" in u]
    loose += [loose_unit(rest[i:i + videos_per_unit]) for i in range(0, len(rest), videos_per_unit)]
    tars = [u for u in kept if "tar" in u]
    tars += [tar_unit(path, size) for path, size in inputs.tars.items() if path not in kept_tars]
    units = sorted(tars, key=lambda u: u["tar"]) + sorted(loose, key=lambda u: u["files"][0])
    return {"version": PLAN_VERSION, "config": config, "videos_per_unit": videos_per_unit, "units": units}


def plan_units(plan: dict, base: Path) -> list[Unit]:
    """The plan's units with paths resolved against the input root; ``index`` is the position in the plan."""
    return [Unit(index=i, name=u["name"], files=[str(base / f) for f in u.get("files", [])],
                 tar=str(base / u["tar"]) if "tar" in u else None) for i, u in enumerate(plan["units"])]
