"""Turn a YAML file plus dotted command-line overrides into a validated JobSpec, or a SpecError."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import Problem, SpecError, did_you_mean, short_repr
from orchestrator.spec import JobSpec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override and validate; every problem found is reported at once."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        hint = "" if path.suffix in (".yaml", ".yml") else "; a job spec is a .yaml file"
        raise SpecError([Problem(source, "", f"no such file{hint} (looked in {Path.cwd()})")])
    text = path.read_text()
    raw = _parse_yaml(text, source)
    raw = apply_overrides(raw, overrides)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_explain(exc, source, text, overrides)) from None


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(source, "", f"invalid YAML: {problem}", line)]) from None
    if raw is None:
        raise SpecError([Problem(source, "", "the file is empty; a job needs at least name, model and data")])
    if not isinstance(raw, dict):
        raise SpecError([Problem(source, "", f"the top level must be a mapping of sections; got {type(raw).__name__}")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`trainer.max_epochs=5`: the value is parsed as YAML, then typed by the schema on validation."""
    problems = []
    for override in overrides:
        source = f"override {override!r}"
        dotted, sep, text = override.partition("=")
        if not sep or not dotted:
            problems.append(Problem(source, "", "overrides look like section.field=value, e.g. trainer.max_epochs=5"))
            continue
        keys = dotted.strip().split(".")
        bad = _unknown_override_key(keys)
        if bad:
            problems.append(Problem(source, dotted, bad))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problems.append(Problem(source, dotted, f"the value is not valid YAML: {exc}"))
            continue
        node = raw
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    if problems:
        raise SpecError(problems)
    return raw


def _unknown_override_key(keys: list[str]) -> str | None:
    """Check the dotted path against the schema; free-form dicts (init_args, tags) accept any key."""
    model: type[BaseModel] | None = JobSpec
    walked: list[str] = []
    for key in keys:
        if model is None:
            return None
        fields = model.model_fields
        if key not in fields:
            where = ".".join(walked) or "the spec"
            return f"no field {key!r} in {where}{did_you_mean(key, fields)}; allowed: {', '.join(fields)}"
        walked.append(key)
        model = _nested_model(fields[key].annotation)
        if model is None and len(walked) < len(keys) and not _is_dict(fields[key].annotation):
            return f"{'.'.join(walked)} is a single value; it has no field {keys[len(walked)]!r}"
    return None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


def _explain(exc: ValidationError, source: str, text: str, overrides) -> list[Problem]:
    overridden = {o.partition("=")[0].strip(): o for o in overrides}
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        dotted = ".".join(loc)
        where = source
        line = None
        if dotted in overridden:
            where = f"override {overridden[dotted]!r}"
        else:
            line = _line_of(text, loc)
        problems.append(Problem(where, dotted, _message(error, loc), line))
    return problems


def _message(error: dict[str, Any], loc: list[str]) -> str:
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"unknown key {loc[-1]!r}{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}"
    if kind == "missing":
        return "is required but missing"
    if kind == "literal_error":
        options = [o.strip(" '") for o in ctx.get("expected", "").replace(" or ", ", ").split(",")]
        return f"{short_repr(given)} is not allowed{did_you_mean(str(given), options)}; allowed: {', '.join(options)}"
    bounds = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}; got {short_repr(given)}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message
    return f"{message[0].lower()}{message[1:]}; got {short_repr(given)}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] | None = JobSpec
    for key in loc:
        field = model.model_fields.get(key) if model else None
        model = _nested_model(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _line_of(text: str, loc: list[str]) -> int | None:
    """1-based line of the deepest key in `loc` that the YAML file spells out."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
