"""Command-line options generated from pydantic configs, plus ``--config FILE.json``.

A command's engine config (an SAE's hyperparameters, a training run's, capture options...) is
defined once, as a pydantic model; `config_options` turns each of its fields into an option
(``batch_size`` → ``--batch-size``, help from the field's description, default from the model),
so a new field is a new option without touching the CLI. ``--config FILE.json`` gives the whole
config at once, shaped like the HTTP request body (``{"sae": {...}, "train": {...}}``); flags given
on the command line override the file. Only what the user gave (in the file or as a flag) reaches
the engine, so "unset" keeps its meaning there (e.g. a batch size chosen from the run's size).
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from kestrel.core.errors import InvalidInputError

F = TypeVar("F", bound=Callable[..., Any])
CONFIG_PARAM = "config_file"
CONTEXT_PARAM = "_config_context"
KEYWORD = inspect.Parameter.KEYWORD_ONLY
SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class ConfigGroup:
    """One pydantic model's fields as options of a command.

    ``exclude`` names fields the user does not set (Kestrel fills them in, e.g. from the run);
    ``names`` keeps an option's existing name where it differs from the field's; ``defaults``
    gives a default to a field the model requires; ``help`` fills in a field that has no
    description. Fields whose type has no command-line form (nested models, dicts) are settable
    through ``--config`` only.
    """

    model: type[BaseModel]
    exclude: frozenset[str] = frozenset()
    names: dict[str, list[str]] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    panel: str | None = None
    validate: bool = True  # False: the engine validates (e.g. fields that need the data to check)

    def option_fields(self) -> dict[str, Any]:
        """The model's fields that become options: name → pydantic FieldInfo."""
        fields = self.model.model_fields
        return {
            name: info
            for name, info in fields.items()
            if name not in self.exclude and option_type(info.annotation) is not None
        }


def option_type(annotation: Any) -> Any:
    """The option's type for a field's annotation (Optional unwrapped); None when it has no flag form."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal and all(isinstance(arg, str) for arg in args):
        return annotation  # choices
    if origin is list and len(args) == 1 and args[0] in SCALARS:
        return annotation  # a repeatable option
    if origin is tuple and args and Ellipsis not in args and all(arg in SCALARS for arg in args):
        return annotation  # nargs=len(args)
    if annotation in SCALARS:
        return annotation
    return None


def kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(group: ConfigGroup, name: str, info: Any) -> tuple[Any, str | bool]:
    """The option's default and how --help shows it: the model's, or the command's for a required field."""
    if name in group.defaults:
        return group.defaults[name], True
    if info.is_required():
        return None, False
    default = info.get_default(call_default_factory=True)
    if default is None:
        return None, False  # derived (the description says how) or off
    return default, True


def build_parameter(dest: str, group: ConfigGroup, name: str, info: Any) -> inspect.Parameter:
    """The typer parameter of one field: ``--kebab-name``, help from the field, the model's default."""
    python_type = option_type(info.annotation)
    default, show = shown_default(group, name, info)
    decls = group.names.get(name) or [kebab(name)]
    if python_type is bool:
        decls = [f"{decls[0]}/--no-{decls[0].removeprefix('--')}", *decls[1:]]
    help_text = info.description or group.help.get(name) or ""
    if get_origin(python_type) is list:
        help_text += " (repeatable)"
    option = typer.Option(
        *decls,
        help=help_text,
        show_default=show,
        rich_help_panel=group.panel,
    )
    annotation = python_type if default is not None else python_type | None
    return inspect.Parameter(
        f"{dest}__{name}",
        KEYWORD,
        default=default,
        annotation=Annotated[annotation, option],
    )


def config_file_parameter(groups: dict[str, ConfigGroup]) -> inspect.Parameter:
    """``--config FILE``, its help naming the file's keys (those of the HTTP request body)."""
    shape = ", ".join(f'"{key}": {{...}}' for key in groups)
    option = typer.Option(
        "--config",
        help=f"a JSON file {{{shape}}} with any of the fields (more than the flags); flags override it",
        rich_help_panel="Config",
    )
    return inspect.Parameter(CONFIG_PARAM, KEYWORD, default=None, annotation=Annotated[Path | None, option])


def read_config_file(path: Path, groups: dict[str, ConfigGroup]) -> dict[str, dict[str, Any]]:
    """The file's section per group; any problem is an `InvalidInputError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--config {path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    keys = ", ".join(repr(key) for key in groups)
    if not isinstance(data, dict):
        raise InvalidInputError(f"--config {path}: expected a JSON object with keys {keys}")
    unknown = sorted(set(data) - set(groups))
    if unknown:
        raise InvalidInputError(f"--config {path}: unknown key(s) {unknown}; expected {keys}")
    for key, section in data.items():
        if not isinstance(section, dict):
            raise InvalidInputError(f"--config {path}: {key!r} must be a JSON object")
    return data


def given_on_command_line(ctx: typer.Context | None, param: str) -> bool:
    """Whether the user set ``param`` (flag or envvar) rather than it taking its default."""
    if ctx is None:  # called as a function: every value counts
        return True
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def validated(group: ConfigGroup, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked by the group's model (with the command's defaults for required fields);
    returns the given values only, as the model parsed them."""
    settable = [name for name in group.model.model_fields if name not in group.exclude]
    unknown = sorted(set(values) - set(settable))
    if unknown:
        raise InvalidInputError(f"invalid {where}: unknown field(s) {unknown}; known: {', '.join(settable)}")
    if not group.validate:
        return values
    try:
        model = group.model.model_validate({**group.defaults, **values})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or where}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        raise InvalidInputError(f"invalid {where}: {problems}") from None
    except InvalidInputError as error:  # the engine's configs raise their own, already worded
        raise InvalidInputError(f"{where}: {error.message}", details=error.details) from None
    return {name: getattr(model, name) for name in values}


def config_options(**groups: ConfigGroup) -> Callable[[F], F]:
    """Replace each ``dest: dict`` parameter of a command with its group's options and ``--config``.

    The command receives, for each ``dest``, a dict of the values the user gave (the file's, then
    the flags'), validated by the model; fields left unset are absent.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name not in groups]
        generated = [
            build_parameter(dest, group, name, info)
            for dest, group in groups.items()
            for name, info in group.option_fields().items()
        ]
        extra = [
            config_file_parameter(groups),
            inspect.Parameter(CONTEXT_PARAM, KEYWORD, default=None, annotation=typer.Context),
        ]
        new_signature = signature.replace(parameters=[*kept, *generated, *extra])

        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.pop(CONTEXT_PARAM, None)
            path = kwargs.pop(CONFIG_PARAM, None)
            from_file = read_config_file(path, groups) if path is not None else {}
            for dest, group in groups.items():
                values = dict(from_file.get(dest, {}))
                for name in group.option_fields():
                    param = f"{dest}__{name}"
                    if param not in kwargs:  # called from Python without it
                        continue
                    value = kwargs.pop(param)
                    if given_on_command_line(ctx, param):
                        values[name] = list(value) if isinstance(value, tuple | list) else value
                where = f"{dest} config" + (f" (--config {path})" if dest in from_file else "")
                kwargs[dest] = validated(group, values, where)
            return fn(*args, **kwargs)

        wrapper.__signature__ = new_signature  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
