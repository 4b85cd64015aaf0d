"""Hook specifications: the whole plugin contract of octopusd, in one place.

Plugins are pluggy plugins in the ``octopusd`` project. A plugin is a module (a built-in file in
``plugins/``, a ``*.py`` file in a directory named by ``plugin_dirs`` in the config, or a module
named by an entry point in the ``octopusd`` group) that defines one or more of the hooks below,
each decorated with :data:`hookimpl`.

Every hook is a *registry hook*: it receives a :class:`~octopusd.plugins.Registry` and adds named
factories to it. Nothing is created at registration time; the daemons look a name up when they
start, and an unknown name fails start-up with the list of registered names. Hooks are
synchronous (pluggy cannot await); any asynchronous work lives on the objects the factories
return.

Loading order (see :func:`octopusd.plugins.load_plugins`): built-ins, then drop-in directories in
the order listed, then entry points; a later registration of an existing name replaces the
earlier one and is logged, so a drop-in may override a built-in on purpose.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from octopusd.plugins import Registry

PROJECT = "octopusd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def octopus_register_aggregators(register: "Registry") -> None:
    """Register aggregation algorithms (the ``train_args.federated_optimizer`` names).

    Called once when the server starts. Add a factory ``factory(config) -> Aggregator`` where
    ``config`` is the frozen :class:`octopusd.config.Config` and the returned object implements
    :class:`octopusd.aggregate.Aggregator`: ``begin_round(global_state, round)``,
    ``accumulate(update, num_samples, sender)`` (called once per accepted update, as it arrives,
    off the event loop), ``finish_round() -> state`` and ``state_dict()/load_state_dict()`` for
    checkpoints. Updates are folded in as they arrive; an aggregator should not keep them all.

    Example::

        @hookimpl
        def octopus_register_aggregators(register):
            register.add("FedAvg", FedAvg, summary="sample-weighted mean")
    """


@hookspec
def octopus_register_datasets(register: "Registry") -> None:
    """Register datasets (the ``data_args.dataset`` names).

    Called once in every process that needs data (server for the test set, trainer processes for
    their silo's partition). Add a factory ``factory(config) -> FederatedDataset`` where the
    returned object has ``output_dim``, ``input_shape``, ``source`` (a human-readable line saying
    where the data came from), ``train_partition(silo_rank)`` (only that silo's samples) and
    ``test_set()``, each returning a :class:`torch.utils.data.Dataset`.

    Example::

        @hookimpl
        def octopus_register_datasets(register):
            register.add("mnist", MnistFederation)
    """


@hookspec
def octopus_register_models(register: "Registry") -> None:
    """Register model architectures (the ``model_args.model`` names).

    Add a factory ``factory(config, output_dim) -> torch.nn.Module``. The factory must be
    deterministic given ``torch.manual_seed`` so every party can build the same architecture; the
    server seeds it with ``common_args.random_seed`` to make the initial global model.

    Example::

        @hookimpl
        def octopus_register_models(register):
            register.add("lr", lambda config, output_dim: LogisticRegression(784, output_dim))
    """


@hookspec
def octopus_register_launchers(register: "Registry") -> None:
    """Register node launchers (``dist_training_args.launcher``; default ``torchrun`` for one
    node, ``pdsh`` for several).

    Add a factory ``factory(config) -> Launcher``; ``await launcher.start(spec)`` starts the
    silo's trainer group described by a :class:`octopusd.silo.group.LaunchSpec` and returns a
    handle with ``await wait() -> int`` and ``await stop(grace_s)`` that must leave no process
    behind on any node.

    Example::

        @hookimpl
        def octopus_register_launchers(register):
            register.add("torchrun", TorchrunLauncher)
    """
