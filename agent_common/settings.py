"""Settings for the command-line agents: a TOML file, then environment variables, then flags.

One loader for every agent, so ``cloud-agent`` and ``edge-agent`` read their configuration the same
way. Environment variables are ``<PREFIX><FIELD>`` in upper case, nested fields joined by ``__``
(``CLOUD_AGENT_WORKERS=8``, ``EDGE_AGENT_POLICY__SPREAD_K=3``); values are parsed by the model,
lists and tables as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

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


def env_overrides(model: type[BaseModel], prefix: str,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``PREFIX_FIELD`` / ``PREFIX_FIELD__SUB`` variables that name fields of ``model``."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    fields = set(model.model_fields)
    for name, raw in environ.items():
        if not name.startswith(prefix):
            continue
        path = [part.lower() for part in name[len(prefix):].split("__")]
        if path and path[0] in fields:
            _set_path(found, path, _env_value(raw))
    return found


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(model: type[S], *, config_file: Path | str | None = None, env_prefix: str = "",
                  overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> S:
    """Build ``model`` from a TOML file, then the environment, then ``overrides`` (flags).

    ``overrides`` keys may be dotted (``"policy.spread_k"``); ``None`` values are ignored, so
    unset command-line flags fall through to the file and the environment.
    """
    data: dict[str, Any] = read_toml(Path(config_file)) if config_file else {}
    if env_prefix:
        data = _merge(data, env_overrides(model, env_prefix, environ))
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(flags, key.split("."), value)
    data = _merge(data, flags)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "<settings>"
        source = f" (from {config_file}, {env_prefix}* environment or flags)" if config_file else ""
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SettingsError(f"setting {where}: {first['msg']}{source}{more}") from exc
