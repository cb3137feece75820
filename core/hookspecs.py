"""Every hook a loraserve plugin can implement, grouped by the phase in which it is called.

Plugins are modules (or objects) listed in the ``loraserve`` entry-point group; built-in plugins
use the same group. A plugin implements a hook by defining a function of the same name decorated
with ``loraserve.hookimpl``; it may accept any subset of the parameters documented here.

Register-style hooks receive a ``register(name, factory, description="", priority=None)`` callback
(:class:`loraserve.contract.Register`). ``name`` is what the user types (``--lora-backend NAME``);
``factory`` is a cheap callable that imports heavy modules (triton, CUDA extensions) only when it is
called; ``description`` is one line shown by ``loraserve plugins``; ``priority`` (device type -> int)
makes the highest-priority backend the default on a device. Registering a name that another plugin
already registered is an error that names both plugins. They may also take ``options``: the
plugin's own options (its :class:`~loraserve.contract.PluginOptions` instance, or None when it
registered none), which also reach every factory it registered as the keyword argument ``options``.

Everything the hooks register or receive is defined in ``loraserve.contract``.

Observer hooks are called after an event has happened; their return values are ignored and an
exception they raise is logged, never propagated into the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from loraserve.contract import PluginOptions, Register

hookspec = pluggy.HookspecMarker("loraserve")


# -- Options: called once, before the command line is parsed -----------------------------------


@hookspec
def loraserve_register_options(register: Callable[[type[PluginOptions]], None]) -> None:
    """Declare the plugin's own options.

    Called once per plugin manager, before the command line is parsed, so the options appear in
    ``--help`` in a group named after the plugin and take ``LORASERVE_*`` environment variables.

    :param register: ``register(options_class)``, with a subclass of
        :class:`loraserve.contract.PluginOptions`; at most once per plugin. A field named like a
        core setting or another plugin's option is an error naming both.
    :return: nothing.
    """


# -- Registration: called once, when the engine (or the CLI) builds its registries ---------------


@hookspec
def loraserve_register_backends(register: Register, options: PluginOptions | None) -> None:
    """Register LoRA kernel backends.

    Called once per engine, after plugins are loaded, to build the backend registry.

    :param register: ``register(name, factory, description="", priority=None)``.
        ``factory(settings, device)`` is called when the backend is chosen with ``--lora-backend
        NAME`` (or is the default: the highest ``priority`` for the device) and returns a
        :class:`loraserve.contract.LoRABackend`.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_attention_backends(register: Register, options: PluginOptions | None) -> None:
    """Register attention backends (attention over the paged KV cache).

    Called once per engine, after plugins are loaded, to build the attention-backend registry.

    :param register: ``register(name, factory, description="", priority=None)``. ``factory(spec)``
        gets a :class:`loraserve.contract.AttentionSpec` when the backend is chosen with
        ``--attention-backend NAME`` (or is the default: the highest ``priority`` for the device) and
        returns a :class:`loraserve.contract.AttentionBackend`.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_eviction_policies(register: Register, options: PluginOptions | None) -> None:
    """Register adapter eviction policies.

    Called once per engine, after plugins are loaded, to build the eviction-policy registry.

    :param register: ``register(name, factory, description="")``. ``factory()`` is called for
        each tier that evicts (GPU slots, host cache) when the policy is chosen with
        ``--lora-eviction-policy NAME`` and returns a
        :class:`loraserve.contract.EvictionPolicy`.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_loaders(register: Register, options: PluginOptions | None) -> None:
    """Register adapter-format loaders.

    Called once per engine, after plugins are loaded, to build the loader registry.

    :param register: ``register(name, factory, description="")``. ``factory()`` returns an
        :class:`loraserve.contract.AdapterLoader`. When an adapter is loaded, each loader's
        ``can_load(source)`` is asked in registration order and the first that accepts loads it.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_resolvers(register: Register, options: PluginOptions | None) -> None:
    """Register adapter resolvers.

    Called once per engine, after plugins are loaded, to build the resolver registry.

    :param register: ``register(name, factory, description="")``. ``factory(settings)`` returns
        an :class:`loraserve.contract.AdapterResolver`, which maps an adapter name that a request
        uses but nobody loaded to a source the loaders can read, or None.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_frontends(register: Register, options: PluginOptions | None) -> None:
    """Register HTTP frontends (groups of routes).

    Called once when the HTTP server is built; every registered frontend is mounted.

    :param register: ``register(name, factory, description="")``. ``factory(app, engine,
        settings)`` (:class:`loraserve.contract.FrontendFactory`) adds routes to the FastAPI
        ``app``, talking to the engine only through ``engine``, an
        :class:`loraserve.contract.EngineClient`; its return value is ignored.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_models(register: Register, options: PluginOptions | None) -> None:
    """Register model architectures.

    Called once per engine, after plugins are loaded, to build the model registry.

    :param register: ``register(name, factory, description="")``. ``name`` is a Hugging Face
        architecture name from ``config.json`` (for example ``LlamaForCausalLM``).
        ``factory(config, dtype, device, tp=None)`` returns the model module; ``tp`` is the
        :class:`loraserve.distributed.TensorParallel` group of this rank with ``--tp-size > 1``
        (the model shards its layers over it), else None.
    :param options: this plugin's options, or None.
    :return: nothing.
    """


# -- Observers: called by the engine after an event --------------------------------------------


@hookspec
def loraserve_adapter_loaded(name: str, version: int, source: str, rank: int, pinned: bool) -> None:
    """An adapter became visible to requests.

    Called after the adapter's weights are validated and registered (before any request uses it).

    :param name: the adapter name requests use.
    :param version: unique id of this load; a reload of the same name gets a new one.
    :param source: where the weights came from (directory or hub id).
    :param rank: the adapter's largest LoRA rank.
    :param pinned: whether the adapter is pinned to a GPU slot.
    :return: ignored.
    """


@hookspec
def loraserve_adapter_evicted(name: str, version: int, tier: str) -> None:
    """An adapter's weights were evicted from one memory tier to make room for another adapter.

    Called after the eviction; the adapter stays registered and is brought back on its next request.

    :param name: the adapter name.
    :param version: the evicted load's version id.
    :param tier: ``"gpu"`` (a batch slot was freed) or ``"host"`` (the host copy was dropped).
    :return: ignored.
    """


@hookspec
def loraserve_adapter_unloaded(name: str, version: int) -> None:
    """An adapter was unloaded by the user.

    Called after its in-flight requests finished and its host and GPU memory was freed.

    :param name: the adapter name, which new requests can no longer use.
    :param version: the unloaded version id.
    :return: ignored.
    """


@hookspec
def loraserve_request_finished(
    request_id: str, adapter: str | None, prompt_tokens: int, completion_tokens: int, finish_reason: str
) -> None:
    """A request finished (completed, stopped, aborted or failed).

    Called once per request, after its KV blocks were freed.

    :param request_id: the engine's id for the request.
    :param adapter: the adapter name, or None for the base model.
    :param prompt_tokens: number of prompt tokens.
    :param completion_tokens: number of generated tokens.
    :param finish_reason: ``"stop"``, ``"length"``, ``"abort"`` or ``"error"``.
    :return: ignored.
    """
