"""The entry point names dependencies that are too old instead of failing deep inside a step."""

from packaging.requirements import Requirement

import videolavit
from videolavit import __main__ as entry
from videolavit.dependencies import DependencyError, declared_requirements, version_problems


def test_declared_requirements_come_from_the_installed_metadata():
    names = {r.name for r in declared_requirements()}
    assert {"torch", "transformers", "diffusers", "lightning", "braceexpand"} <= names
    torch_req = next(r for r in declared_requirements() if r.name == "torch")
    assert "2.14" in str(torch_req.specifier)  # the cap that keeps the CPU build


def test_version_problems_name_the_package_the_version_and_the_fix():
    reqs = [Requirement("transformers>=4.56,<6"), Requirement("torch>=2.6,<2.14"), Requirement("braceexpand>=0.1.7")]
    installed = {"transformers": "4.45.0", "torch": "2.13.0+cpu"}
    problems = version_problems(reqs, installed=installed.get)
    assert len(problems) == 2
    assert "transformers 4.45.0 is installed but videolavit needs transformers<6,>=4.56" in problems[0]
    assert "pip install 'transformers<6,>=4.56'" in problems[0]
    assert problems[1].startswith("braceexpand is not installed")


def test_local_build_suffix_satisfies_the_range():
    assert version_problems([Requirement("torch>=2.6,<2.14")], installed={"torch": "2.13.0+cpu"}.get) == []
    assert version_problems([Requirement("torch>=2.6,<2.14")], installed={"torch": "2.14.0"}.get)


def test_main_exits_2_with_one_line_when_a_dependency_is_too_old(monkeypatch, capsys):
    def too_old():
        raise DependencyError("diffusers 0.30.0 is installed but videolavit needs diffusers<1,>=0.33")

    monkeypatch.setattr(entry, "check_dependencies", too_old)
    monkeypatch.delenv(entry.SKIP_DEPENDENCY_CHECK, raising=False)
    assert entry.main(["synth", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusers 0.30.0" in err[0] and entry.SKIP_DEPENDENCY_CHECK in err[0]


def test_version_flag(capsys):
    assert entry.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"videolavit {videolavit.__version__}"
