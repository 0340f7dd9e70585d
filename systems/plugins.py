"""Systems from outside moebench: plugin references and installed entry points.

A **plugin reference** names a :class:`~systems.base.MoESystem` subclass:

* ``package.module:ClassName``: imported with importlib (the module must be
  importable: installed, or on ``PYTHONPATH``);
* ``path/to/file.py:ClassName`` or ``path/to/file.py``: the file is loaded
  under a module name of its own (registered in ``sys.modules``, so
  dataclasses and pickling work) and its folder is appended to ``sys.path``
  (so it can import modules next to it). Without ``:ClassName`` the file must
  define exactly one concrete MoESystem subclass itself (an imported one does
  not count). A relative path is resolved against ``base_dir`` (default: the
  current working directory) when it is registered and stored absolute.

The class must have a ``name`` (letters, digits, ``_`` and ``-``) that is
not a built-in system's. :func:`register_plugins` is what every command calls
with its ``--system-plugin`` values; it returns the systems' names. Each name's
absolute reference (:func:`references_for`) travels in the trial spec, so a
trial child or check worker registers the same class in its fresh process.

**Entry points**: every entry point of the group ``moebench.systems`` in the
installed distributions is a system, entry point name -> ``module:Class``
(``[project.entry-points."moebench.systems"]`` in a pyproject.toml). They
are found lazily, the first time the registry is asked for its names, and a
class is imported only when it is used. One that cannot be imported, or is
not a valid system, is an unavailable system with the reason, never a crash.
An entry point named like a built-in system, or like an earlier entry point,
is ignored (:func:`ignored_entry_points` says which and why).

This module belongs to ``systems`` and must not import ``harness``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from systems.base import MoESystem

ENTRY_POINT_GROUP = "moebench.systems"
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")  # no ',' '.' ':' (the CLI splits on them)
_MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_CLASS_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_BY_NAME: dict[str, type[MoESystem]] = {}  # registered plugin systems: name -> class
_REFERENCE: dict[str, str] = {}  # name -> its absolute reference
_FILE_MODULES: dict[str, ModuleType] = {}  # absolute path -> the module loaded from it
_entry_points: dict[str, tuple[str, str]] | None = None  # name -> (value, distribution); None: not yet read
_ignored_entry_points: dict[str, str] = {}


class PluginError(ValueError):
    """A plugin reference that cannot be used; the message is one line naming it and why."""


# ----------------------------------------------------------------- references

def _is_file_reference(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _split(ref: str) -> tuple[str, str | None]:
    """(module or path, class name or None)."""
    target, colon, class_name = ref.rpartition(":")
    if not colon or _is_file_reference(class_name):  # a ':' inside a path
        return ref, None
    if not _CLASS_PATTERN.match(class_name):
        raise PluginError(f"plugin reference {ref!r}: {class_name!r} is not a class name")
    return target, class_name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _module_name_for(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"moebench_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _load_file(path: Path) -> ModuleType:
    key = str(path)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    if not path.is_file():
        raise PluginError(f"plugin file {path} does not exist or is not a file")
    if path.suffix != ".py":
        raise PluginError(f"plugin file {path} is not a .py file")
    module_name = _module_name_for(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's file is one line naming it
        del sys.modules[module_name]
        raise PluginError(f"cannot load plugin file {path}: {_one_line(exc)}") from None
    _FILE_MODULES[key] = module
    return module


def _only_system_in(module: ModuleType, path: Path) -> str:
    """The class name of the one concrete MoESystem subclass defined in the file itself."""
    defined = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, MoESystem) and obj is not MoESystem
               and obj.__module__ == module.__name__]
    concrete = [cls for cls in defined if not inspect.isabstract(cls)]
    if len(concrete) == 1:
        return concrete[0].__name__
    if not concrete:
        found = f" (only abstract ones: {', '.join(c.__name__ for c in defined)})" if defined else ""
        raise PluginError(f"plugin file {path} defines no MoESystem subclass{found}; "
                          f"name the class with {path}:ClassName")
    names = ", ".join(sorted(c.__name__ for c in concrete))
    raise PluginError(f"plugin file {path} defines {len(concrete)} MoESystem subclasses ({names}); "
                      f"choose one with {path}:ClassName")


def _validate_class(obj, where: str) -> type[MoESystem]:
    if not (inspect.isclass(obj) and issubclass(obj, MoESystem)):
        raise PluginError(f"{where} is not a subclass of systems.base.MoESystem")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} has no `name` class attribute (the system's name, e.g. name = \"my_moe\")")
    if not NAME_PATTERN.match(name):
        raise PluginError(f"{where}: system name {name!r} must be letters, digits, '_' or '-' "
                          "(starting with a letter or '_')")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginError(f"{where} is abstract: it does not define {missing}")
    return obj


def resolve(ref: str, base_dir: str | os.PathLike | None = None) -> tuple[str, type[MoESystem]]:
    """(absolute reference, class) of a plugin reference, without registering it.

    The absolute reference always names the class (``/abs/file.py:Class`` or ``module:Class``)."""
    if not isinstance(ref, str) or not ref.strip():
        raise PluginError(f"plugin reference must be package.module:ClassName or path/to/file.py[:ClassName], "
                          f"got {ref!r}")
    ref = ref.strip()
    target, class_name = _split(ref)
    if _is_file_reference(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else os.getcwd()) / path
        path = Path(os.path.normpath(path))
        module = _load_file(path)
        class_name = class_name or _only_system_in(module, path)
        where = f"{path}:{class_name}"
        if not hasattr(module, class_name):
            raise PluginError(f"plugin file {path} has no class {class_name!r}")
        return where, _validate_class(getattr(module, class_name), where)
    if class_name is None or not _MODULE_PATTERN.match(target):
        raise PluginError(f"plugin reference {ref!r} must be package.module:ClassName or "
                          "path/to/file.py[:ClassName]")
    try:
        module = importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001 - an import failure of the user's module is one line
        raise PluginError(f"cannot import plugin module {target!r}: {_one_line(exc)}") from None
    if not hasattr(module, class_name):
        raise PluginError(f"plugin module {target!r} has no class {class_name!r}")
    return ref, _validate_class(getattr(module, class_name), ref)


def _builtin_names() -> set[str]:
    import systems  # the package's registry of built-ins (lazy: systems/__init__ imports this module)

    return set(systems.REGISTRY)


def register_plugin(ref: str, base_dir: str | os.PathLike | None = None) -> str:
    """Register one plugin reference; returns its system's name. Registering the same class
    again is a no-op. PluginError (a ValueError, one line) when it cannot be used."""
    absolute, cls = resolve(ref, base_dir)
    name = cls.name
    if name in _builtin_names():
        raise PluginError(f"plugin {absolute}: system name {name!r} is a built-in system's; "
                          "give the class another name")
    if name in _BY_NAME:
        if _BY_NAME[name] is cls:
            return name
        raise PluginError(f"plugin {absolute}: system name {name!r} is already registered by {_REFERENCE[name]}")
    entry = entry_point_systems().get(name)
    if entry is not None and entry[0] != absolute:
        raise PluginError(f"plugin {absolute}: system name {name!r} is already the entry point "
                          f"{name} = {entry[0]} (of {entry[1]})")
    _BY_NAME[name] = cls
    _REFERENCE[name] = absolute
    return name


def register_plugins(refs, base_dir: str | os.PathLike | None = None) -> list[str]:
    """Register every plugin reference in `refs` (None or empty: none); returns their system
    names, in order. Relative file paths are resolved against `base_dir` (default: the current
    working directory). The first bad reference raises PluginError (a ValueError, one line)."""
    return [register_plugin(ref, base_dir) for ref in (refs or ())]


def plugin_names() -> list[str]:
    """Systems registered from plugin references, in registration order."""
    return list(_BY_NAME)


def plugin_class(name: str) -> type[MoESystem] | None:
    return _BY_NAME.get(name)


def references_for(name: str) -> tuple[str, ...]:
    """What a fresh process must register to find system `name`: (its absolute reference,) for a
    plugin, () for a built-in or an entry point (a child finds those itself). A TrialSpec's plugins."""
    return (_REFERENCE[name],) if name in _REFERENCE else ()


# ----------------------------------------------------------------- entry points

def entry_point_systems() -> dict[str, tuple[str, str]]:
    """Installed entry points of group moebench.systems: name -> (module:Class, distribution).
    Read once per process; names of built-in systems (and repeats) are left out."""
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import entry_points

        found: dict[str, tuple[str, str]] = {}
        ignored: dict[str, str] = {}
        builtins = _builtin_names()
        try:
            eps = list(entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # noqa: BLE001 - broken metadata must not stop the harness
            eps = []
            ignored["(metadata)"] = f"reading the installed entry points failed: {_one_line(exc)}"
        for ep in eps:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed distribution"
            if ep.name in builtins:
                ignored[ep.name] = f"entry point {ep.name} = {ep.value} (of {dist}) is named like a built-in system"
            elif ep.name in found:
                ignored.setdefault(ep.name, f"entry point {ep.name} = {ep.value} (of {dist}) repeats a name "
                                            f"already given by {found[ep.name][1]}")
            else:
                found[ep.name] = (ep.value, dist)
        _entry_points = found
        _ignored_entry_points.clear()
        _ignored_entry_points.update(ignored)
    return _entry_points


def ignored_entry_points() -> dict[str, str]:
    """{name: why} for entry points that are not systems (named like a built-in, or repeated)."""
    entry_point_systems()
    return dict(_ignored_entry_points)


def forget_entry_points() -> None:
    """Read the entry points again on the next lookup (after installing a distribution)."""
    global _entry_points
    _entry_points = None


def entry_point_names() -> list[str]:
    """Entry-point systems that are not shadowed by a registered plugin of the same class."""
    return [name for name in entry_point_systems() if name not in _BY_NAME]


def load_entry_point_class(name: str) -> type[MoESystem]:
    """The class an entry point names. ImportError (one line, with the reason) when it cannot be
    imported or is not a valid system, so availability() reports it as unavailable."""
    value, dist = entry_point_systems()[name]
    module_name, colon, class_name = value.partition(":")
    where = f"entry point {name} = {value} (of {dist})"
    if not colon or not _MODULE_PATTERN.match(module_name.strip()) or not _CLASS_PATTERN.match(class_name.strip()):
        raise ImportError(f"{where}: the value must be module:Class")
    try:
        module = importlib.import_module(module_name.strip())
        obj = getattr(module, class_name.strip())
    except Exception as exc:  # noqa: BLE001 - whatever the package does at import, it is a reason
        raise ImportError(f"{where}: {_one_line(exc)}") from None
    try:
        cls = _validate_class(obj, where)
    except PluginError as exc:
        raise ImportError(str(exc)) from None
    if cls.name != name:
        raise ImportError(f"{where}: the class's name is {cls.name!r}, not the entry point's name {name!r}")
    return cls


def source_of(name: str) -> str:
    """Where system `name` comes from: "built-in", "plugin REF" or "entry point NAME = VALUE (of DIST)"."""
    if name in _BY_NAME:
        return f"plugin {_REFERENCE[name]}"
    entry = entry_point_systems().get(name)
    if entry is not None:
        return f"entry point {name} = {entry[0]} (of {entry[1]})"
    return "built-in"
