"""Settings for the command-line agents: a TOML file, then environment variables, then flags.

One loader for every agent, so ``cloud-agent`` and ``edge-agent`` read their configuration the same
way. Environment variables are ``<PREFIX><FIELD>`` in upper case, nested fields joined by ``__``
(``CLOUD_AGENT_WORKERS=8``, ``EDGE_AGENT_POLICY__SPREAD_K=3``); values are parsed by the model,
lists and tables as JSON.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, SecretStr, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

S = TypeVar("S", bound=BaseModel)


class SettingsError(ValueError):
    """A configuration that cannot be used; the message names the field and where it came from."""


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises :class:`SettingsError`."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc


def _closest(name: str, valid: list[str], spell: Callable[[str], str] = str) -> str:
    """`` (did you mean X?)`` for the valid name nearest to ``name``, or an empty string."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {spell(match[0])}?)" if match else ""


def env_overrides(model: type[BaseModel], prefix: str,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``PREFIX_FIELD`` / ``PREFIX_FIELD__SUB`` variables that name fields of ``model``.

    A variable with the prefix that names no field is an error (a misspelt name would otherwise be
    ignored in silence), with the closest valid name.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    fields = list(model.model_fields)
    unknown: list[str] = []
    for name, raw in environ.items():
        if not name.startswith(prefix):
            continue
        path = [part.lower() for part in name[len(prefix):].split("__")]
        if path[0] in fields:
            _set_path(found, path, _env_value(raw))
        else:
            unknown.append(f"environment variable {name} names no setting"
                           + _closest(path[0], fields, lambda field: prefix + field.upper()))
    if unknown:
        raise SettingsError("; ".join(sorted(unknown)))
    return found


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The nested model a validation error's location points into (through lists and optionals)."""
    current: type[BaseModel] = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *get_args(field.annotation)]
        candidates += [inner for arg in get_args(field.annotation) for inner in get_args(arg)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        current = nested[0]
    return current


def _describe(model: type[BaseModel], error: Any) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(part) for part in loc) or "<settings>"
    if error["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        hint = _closest(str(loc[-1]), list(owner.model_fields)) if owner else ""
        return f"setting {where}: unknown setting{hint}"
    return f"setting {where}: {error['msg']}"


def _read_secret(path: str) -> str:
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"setting password_file: cannot read {path}: {exc.strerror}") from exc


def load_settings(model: type[S], *, config_file: Path | str | None = None, env_prefix: str = "",
                  overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> S:
    """Build ``model`` from a TOML file, then the environment, then ``overrides`` (flags).

    ``overrides`` keys may be dotted (``"policy.spread_k"``); ``None`` values are ignored, so
    unset command-line flags fall through to the file and the environment. Secrets (fields typed
    ``SecretStr``) are refused from ``overrides``: a flag shows in ``ps`` and the shell history.
    ``password_file`` (when the model has it) supplies ``password`` unless that is set. Every
    problem is named in the one :class:`SettingsError`, unknown names with the closest valid one.
    """
    data: dict[str, Any] = read_toml(Path(config_file)) if config_file else {}
    if env_prefix:
        data = _merge(data, env_overrides(model, env_prefix, environ))
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        field = model.model_fields.get(key)
        if field is not None and SecretStr in (field.annotation, *get_args(field.annotation)):
            raise SettingsError(f"{key} is a secret: set {env_prefix}{key.upper()} or {key}_file, "
                                "not a command-line flag")
        _set_path(flags, key.split("."), value)
    data = _merge(data, flags)
    if "password_file" in model.model_fields and data.get("password_file") and not data.get("password"):
        data["password"] = _read_secret(str(data["password_file"]))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(model, error) for error in exc.errors(include_url=False)]
        source = f" (from {config_file}, {env_prefix}* environment or flags)" if config_file else ""
        raise SettingsError("; ".join(problems) + source) from exc
