"""Import and build classes named LightningCLI-style (`class_path` + `init_args`), and check them early.

jsonargparse (LightningCLI's engine) would do this but pulls its own CLI model and config semantics;
we need only import, signature check and recursive build, with our own error format.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from orchestrator.errors import Problem, SpecError, did_you_mean, is_import_deadlock, short_repr


def import_class(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [name for name in dir(module) if not name.startswith("_")]
        raise ImportError(f"module {module_name!r} has no {attr!r}{did_you_mean(attr, public)}") from None


def instantiate(spec: dict[str, Any]) -> Any:
    """Build `class_path(**init_args)`; nested dicts with a class_path are built first, as jsonargparse does."""
    cls = import_class(spec["class_path"])
    return cls(**{key: _build_nested(value) for key, value in (spec.get("init_args") or {}).items()})


def _build_nested(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
        return instantiate(value)
    if isinstance(value, list):
        return [_build_nested(item) for item in value]
    return value


def check_class(field: str, class_path: str, init_args: dict[str, Any], base: type | None) -> list[Problem]:
    """Problems with one `class_path` + `init_args`, found without building anything."""
    try:
        cls = import_class(class_path)
    except Exception as exc:  # any import-time failure of user code is the user's to see
        if is_import_deadlock(exc):  # two threads importing at once (the driver's Ray start): not the user's
            raise
        return [Problem("", f"{field}.class_path", f"cannot import {class_path!r}: {type(exc).__name__}: {exc}")]
    if not isinstance(cls, type):
        return [Problem("", f"{field}.class_path", f"{class_path!r} is a {type(cls).__name__}, not a class")]
    if base is not None and not issubclass(cls, base):
        return [Problem("", f"{field}.class_path", f"{class_path!r} must subclass {base.__module__}.{base.__qualname__}")]
    return _check_init_args(field, cls, init_args)


def _check_init_args(field: str, cls: type, init_args: dict[str, Any]) -> list[Problem]:
    signature = inspect.signature(cls.__init__)
    params = [p for name, p in signature.parameters.items() if name != "self"]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    problems = []
    for key, value in init_args.items():
        if key not in named and not takes_any:
            accepted = ", ".join(named) or "no arguments"
            problems.append(Problem(
                "", f"{field}.init_args.{key}",
                f"{cls.__name__} does not accept {key!r}{did_you_mean(key, named)}; it accepts: {accepted}",
            ))
        elif key in named:
            type_problem = _check_type(named[key], value)
            if type_problem:
                problems.append(Problem("", f"{field}.init_args.{key}", type_problem))
    missing = [name for name, p in named.items() if p.default is p.empty and name not in init_args]
    if missing:
        problems.append(Problem("", f"{field}.init_args", f"{cls.__name__} needs {', '.join(map(repr, missing))}; none given"))
    return problems


def _check_type(param: inspect.Parameter, value: Any) -> str | None:
    """Check plain annotations (int, float, list[int], Literal...) with pydantic; skip what it cannot model."""
    if param.annotation is param.empty or isinstance(value, dict) and "class_path" in value:
        return None
    try:
        from pydantic import TypeAdapter, ValidationError

        TypeAdapter(param.annotation).validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"{first['msg'][0].lower()}{first['msg'][1:]}; got {short_repr(value)}"
    except Exception:  # annotations pydantic cannot build a schema for (torch types, strings) are not ours to judge
        return None
    return None


def check_spec_classes(spec, source: str) -> None:
    """Import model and data classes and check their init_args; raise one SpecError listing every problem."""
    from lightning.pytorch import LightningDataModule, LightningModule

    problems = check_class("model", spec.model.class_path, spec.model.init_args, LightningModule)
    problems += check_class("data", spec.data.class_path, spec.data.init_args, LightningDataModule)
    if problems:
        raise SpecError(Problem(source, p.field, p.message) for p in problems)


def looks_importable(class_path: str) -> bool:
    """Whether `class_path` names something its module defines, told without running the module.

    The module is found (its parent packages are imported, nothing more) and its source parsed; the name must
    be defined or imported at its top level. True when that cannot be told statically (a compiled module, a
    star import, a module-level __getattr__). For a cheap first look only: import_class() is the real check.
    """
    module_name, _, attr = class_path.rpartition(".")
    try:
        found = importlib.util.find_spec(module_name) if module_name else None
    except Exception:  # a parent package that does not import
        return False
    if found is None:
        return False
    if not found.origin or not found.origin.endswith(".py"):
        return True
    try:
        tree = ast.parse(Path(found.origin).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return False
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return True
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        else:  # if/try blocks at top level (optional imports): anything they bind counts
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
            names.update(n.name for n in ast.walk(node) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))
            names.update((a.asname or a.name).split(".")[0] for n in ast.walk(node)
                         if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names)
    return attr in names or "__getattr__" in names
