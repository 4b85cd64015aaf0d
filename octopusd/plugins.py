"""Plugin loading and the typed registry the daemons look names up in.

Loading happens inside :func:`load_plugins`, never at import time, in a fixed order: the
built-ins shipped in ``plugins/``, then each ``plugin_dirs`` directory in the order the config
lists them, then installed packages' entry points in the ``octopusd`` group, then pluggy's
``check_pending()`` so a misspelt hook name fails loudly.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy
import structlog

from octopusd import hookspecs
from octopusd.errors import PluginError, UnknownPluginError

log = structlog.get_logger(__name__)

KINDS = ("aggregator", "dataset", "model", "launcher")


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    summary: str
    origin: str


@dataclass
class Registry:
    """Named factories of one kind; the object every ``octopus_register_*`` hook receives."""

    kind: str
    _entries: dict[str, Entry] = field(default_factory=dict)
    _origin: str = "?"

    def add(self, name: str, factory: Callable[..., Any], *, summary: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self._origin}: {self.kind} name must be a non-empty string")
        if not callable(factory):
            raise PluginError(f"{self._origin}: {self.kind} {name!r}: factory is not callable")
        if name in self._entries:
            log.info("plugin_override", kind=self.kind, name=name,
                     old=self._entries[name].origin, new=self._origin)
        self._entries[name] = Entry(name, factory, summary, self._origin)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name].factory
        except KeyError:
            raise UnknownPluginError(self.kind, name, list(self._entries)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


class PluginManager:
    """Typed wrapper around pluggy: one method per hook, nothing else calls ``pm.hook``."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in KINDS}

    def register_module(self, module: ModuleType, origin: str) -> None:
        if self._pm.is_registered(module):
            return
        try:
            self._pm.register(module, name=origin)
        except (pluggy.PluginValidationError, ValueError) as exc:
            # A hookimpl whose parameters do not match its spec, or a name registered twice.
            raise PluginError(f"{origin}: cannot register plugin: {exc}") from exc
        # Fill registries per plugin so each entry records where it came from.
        for kind, hook in self._hooks().items():
            registry = self.registries[kind]
            registry._origin = origin
            for impl in hook.get_hookimpls():
                if impl.plugin is module:
                    impl.function(register=registry)
            registry._origin = "?"

    def _hooks(self) -> dict[str, Any]:
        h = self._pm.hook
        return {
            "aggregator": h.octopus_register_aggregators,
            "dataset": h.octopus_register_datasets,
            "model": h.octopus_register_models,
            "launcher": h.octopus_register_launchers,
        }

    def check_pending(self) -> None:
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin defines an unknown hook: {exc}") from exc

    # Typed lookups -------------------------------------------------------------------------
    def aggregator(self, name: str) -> Callable[..., Any]:
        return self.registries["aggregator"].get(name)

    def dataset(self, name: str) -> Callable[..., Any]:
        return self.registries["dataset"].get(name)

    def model(self, name: str) -> Callable[..., Any]:
        return self.registries["model"].get(name)

    def launcher(self, name: str) -> Callable[..., Any]:
        return self.registries["launcher"].get(name)


def builtin_plugin_dir() -> Path:
    """Where the built-in plugins are: inside the installed package, or ``plugins/`` in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "builtin_plugins"
    return installed if installed.is_dir() else here.parent / "plugins"


def _import_file(path: Path) -> ModuleType:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"octopusd_dropin_{digest}_{path.stem}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken drop-in must say which file broke
        del sys.modules[mod_name]
        raise PluginError(f"plugin file {path} failed to import: {exc!r}") from exc
    return module


def _dir_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise PluginError(f"plugin directory {directory} does not exist or is not a directory")
    return sorted(p for p in directory.rglob("*.py")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(directory).parts))


def load_plugins(plugin_dirs: Iterable[str | Path] = (), *, entry_points: bool = True) -> PluginManager:
    """Build a :class:`PluginManager`: built-ins, drop-in dirs, entry points, then check."""
    pm = PluginManager()
    for path in _dir_files(builtin_plugin_dir()):
        pm.register_module(_import_file(path), f"builtin:{path.stem}")
    for directory in plugin_dirs:
        for path in _dir_files(Path(directory).expanduser()):
            pm.register_module(_import_file(path), f"dropin:{path}")
    if entry_points:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(f"entry point {ep.name} ({ep.value}) failed to load: {exc!r}") from exc
            pm.register_module(module, f"entrypoint:{ep.name}")
    pm.check_pending()
    return pm
