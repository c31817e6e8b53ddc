"""The spec layer in-process: typed overrides, recipe sugar, and every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from orchestrator.classpath import check_spec_classes
from orchestrator.errors import SpecError
from orchestrator.loader import load_spec
from orchestrator.plan import build_plan

JOB_FILES = sorted((REPO / "jobs").glob("**/*.yaml"))


def test_there_are_recipes():
    assert JOB_FILES, "jobs/ holds no YAML specs"


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates_without_training(path: Path):
    spec = load_spec(path)
    check_spec_classes(spec, str(path))
    plan = build_plan(spec, str(path), check_fit=False)
    assert plan.parameters.total > 0
    assert plan.world_size == spec.scaling.num_workers


def test_overrides_are_typed_by_the_schema():
    spec = load_spec(REPO / "jobs/digits.yaml", [
        "trainer.max_epochs=3", "scaling.num_workers=1", "trainer.precision=bf16-mixed",
        "trainer.deterministic=true", "model.init_args.lr=0.01", "tracking.tags.team=vision",
        "scaling.placement=spread",
    ])
    assert spec.trainer.max_epochs == 3 and isinstance(spec.trainer.max_epochs, int)
    assert spec.scaling.num_workers == 1
    assert spec.trainer.precision == "bf16-mixed"
    assert spec.trainer.deterministic is True
    assert spec.model.init_args["lr"] == 0.01
    assert spec.tracking.tags["team"] == "vision"
    assert spec.scaling.placement == "SPREAD"


def test_bare_precision_numbers_are_normalised():
    assert load_spec(REPO / "jobs/digits.yaml", ["trainer.precision=16"]).trainer.precision == "16-mixed"
    assert load_spec(REPO / "jobs/digits.yaml", ["trainer.precision=32"]).trainer.precision == "32-true"


def test_recipe_name_is_sugar_for_class_paths(tmp_path: Path):
    job = tmp_path / "short.yaml"
    job.write_text("name: short\nmodel: digits\ndata: digits\n")
    spec = load_spec(job)
    assert spec.model.class_path == "jobs.digits.DigitsCNN"
    assert spec.data.class_path == "jobs.digits.DigitsDataModule"


def test_a_job_needs_a_way_to_stop(tmp_path: Path):
    job = tmp_path / "forever.yaml"
    job.write_text("name: forever\nmodel: digits\ndata: digits\ntrainer: {max_epochs: null}\n")
    with pytest.raises(SpecError, match="max_epochs or max_steps"):
        load_spec(job)


def test_nested_class_paths_in_init_args_are_built():
    from orchestrator.classpath import instantiate

    built = instantiate({"class_path": "collections.OrderedDict",
                         "init_args": {"inner": {"class_path": "fractions.Fraction", "init_args": {"numerator": 3}}}})
    from fractions import Fraction

    assert built["inner"] == Fraction(3)


def test_secrets_never_become_params():
    from orchestrator.tracking.run import flatten

    flat = flatten({"tracking": {"uri": "http://alice:hunter2@mlflow.example:5000", "tags": {"api_token": "abc"}}})
    assert "hunter2" not in str(flat) and "abc" not in str(flat)
    assert flat["tracking.tags.api_token"] == "***"


def test_tracking_uri_is_made_absolute(tmp_path: Path, monkeypatch):
    from orchestrator.tracking.uri import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
