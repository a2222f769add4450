"""The method registry: every token-reduction method tokenscope knows, built in or from a plugin.

Built-in methods are the modules of `analysis.methods`; each registers its class with `register`
when imported. Methods from outside the package arrive the same way, from any of:
- a Python file or module named on the command line (`python -m analysis --plugin my_method.py ...`);
- the environment variable `TOKENSCOPE_PLUGINS` (paths or module names, separated by the OS path
  separator, ':' on Linux), read by every surface: the CLI, the app and the sweep's workers;
- the Python entry-point group `tokenscope.methods` of installed packages (each entry point names a
  module, or a `Method` subclass, which is then registered).

`all_methods()` and `get_method()` load the built-in methods, the entry points and the environment
plugins on first use, so every caller sees the same registry without importing anything else.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import PlanError, PluginError

ENTRY_POINT_GROUP = "tokenscope.methods"
PLUGINS_ENV = "TOKENSCOPE_PLUGINS"

METHODS: dict[str, Any] = {}
_ORIGIN: dict[str, str] = {}   # method name -> where it came from ("builtin", a path, an entry point)
_loaded_sources: set[str] = set()
_builtins_loaded = False
_loading_source: str | None = None


def register(cls):
    """Class decorator: add a `Method` subclass to the registry under its `name` (an instance of it).

    Raises PluginError when the name is empty, not a lower-case identifier, "none" (the dense model)
    or already taken by a different class.
    """
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or name != name.lower() or name in ("none", "dense"):
        raise PluginError(f"method class {cls.__qualname__} needs a lower-case identifier as its `name` (got {name!r})")
    current = METHODS.get(name)
    if current is not None and type(current).__qualname__ != cls.__qualname__:
        raise PluginError(f"a method named {name!r} is already registered ({_ORIGIN.get(name, '?')}); choose another name for {cls.__qualname__}")
    METHODS[name] = cls()
    _ORIGIN[name] = _loading_source or "builtin"
    return cls


def _load_builtins() -> None:
    """The built-in methods and the entry points (once), then any `TOKENSCOPE_PLUGINS` source not
    loaded yet (checked on every call, so a page that sets the variable later still gets it)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("analysis.methods")  # its __init__ imports every method module
        for point in _entry_points():
            _load_entry_point(point)
    for source in plugins_from_env():
        if _source_key(source) not in _loaded_sources:
            load_plugin(source)


def _source_key(source: str | os.PathLike) -> str:
    text = str(source)
    path = Path(text).expanduser()
    return str(path.resolve()) if text.endswith(".py") or path.is_file() else text


def _entry_points() -> list[metadata.EntryPoint]:
    try:
        return list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # noqa: BLE001 - a broken installed distribution must not stop tokenscope
        return []


def _load_entry_point(point: metadata.EntryPoint) -> list[str]:
    global _loading_source
    label = f"entry point {point.name} = {point.value}"
    if label in _loaded_sources:
        return []
    before = set(METHODS)
    _loading_source = label
    try:
        loaded = point.load()
    except Exception as err:  # noqa: BLE001 - any failure of third-party code is a plugin error
        raise PluginError(f"{label} ({ENTRY_POINT_GROUP}) could not be loaded: {type(err).__name__}: {err}") from None
    finally:
        _loading_source = None
    if isinstance(loaded, type) and getattr(loaded, "name", None) and loaded.name not in METHODS:
        _loading_source = label
        try:
            register(loaded)
        finally:
            _loading_source = None
    _loaded_sources.add(label)
    return sorted(set(METHODS) - before)


def plugins_from_env() -> list[str]:
    """The plugin sources named in `TOKENSCOPE_PLUGINS` (blank parts ignored)."""
    return [part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if part.strip()]


def load_plugin(source: str | os.PathLike) -> list[str]:
    """Import a plugin: a `.py` file path or an importable module name; its `@register` classes join
    the registry. Loading the same source twice does nothing the second time.

    Returns:
        the names of the methods it registered (empty on a repeated load).
    Raises:
        PluginError: the file does not exist, the import fails (the message names the error), or it
            registers no method.
    """
    global _loading_source
    text = str(source)
    key = _source_key(source)
    if key in _loaded_sources:
        return []
    _loaded_sources.add(key)  # also guards against the environment loop below re-entering
    _load_builtins()
    path = Path(text).expanduser()
    is_file = text.endswith(".py") or path.is_file()
    if is_file and not path.is_file():
        _loaded_sources.discard(key)
        raise PluginError(f"plugin file {text} does not exist")
    before = set(METHODS)
    _loading_source = key
    try:
        if is_file:
            module_name = f"tokenscope_plugin_{path.stem}_{abs(hash(key)) % 10**8}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"plugin {text} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(text)
    except PluginError:
        _loaded_sources.discard(key)
        raise
    except Exception as err:  # noqa: BLE001 - the plugin's own failure, reported in one line
        _loaded_sources.discard(key)
        raise PluginError(f"plugin {text} could not be loaded: {type(err).__name__}: {err}") from None
    finally:
        _loading_source = None
    added = sorted(set(METHODS) - before)
    if not added:
        raise PluginError(f"plugin {text} registered no method: decorate a Method subclass with @register")
    return added


def unregister(name: str) -> None:
    """Remove method `name` and forget the plugin source it came from (for tests and tools that load
    a plugin for a while); a built-in method cannot be removed. Raises PlanError for an unknown name."""
    if name not in METHODS:
        raise PlanError(f"unknown method {name!r}")
    source = _ORIGIN.get(name, "builtin")
    if source == "builtin":
        raise PlanError(f"{name} is a built-in method and cannot be unregistered")
    del METHODS[name]
    del _ORIGIN[name]
    if source not in _ORIGIN.values():
        _loaded_sources.discard(source)


def all_methods() -> dict[str, Any]:
    """Every registered method by name, ordered by each method's `rank`, then registration order."""
    _load_builtins()
    order = {name: index for index, name in enumerate(METHODS)}
    return dict(sorted(METHODS.items(), key=lambda item: (getattr(item[1], "rank", 1000), order[item[0]])))


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(all_methods())


def origin(name: str) -> str:
    """Where method `name` came from: "builtin", a plugin path or module, or an entry point."""
    all_methods()
    return _ORIGIN.get(name, "?")


def get_method(name: str):
    """The registered method called `name`. Raises PlanError naming the known methods."""
    methods = all_methods()
    try:
        return methods[name]
    except KeyError:
        raise PlanError(f"unknown method {name!r}: choose none or one of {', '.join(sorted(methods))}") from None
