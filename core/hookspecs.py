"""Every hook a loraserve plugin can implement, grouped by the phase in which it is called.

Plugins are modules (or objects) listed in the ``loraserve`` entry-point group; built-in plugins
use the same group. A plugin implements a hook by defining a function of the same name decorated
with ``loraserve.hookimpl``; it may accept any subset of the parameters documented here.

Register-style hooks receive a ``register(name, factory, description="")`` callback. ``name`` is
what the user types (``--backend NAME``); ``factory`` is a cheap callable that imports heavy
modules (triton, CUDA extensions) only when it is called; ``description`` is one line shown by
``loraserve plugins``. Registering a name that another plugin already registered is an error that
names both plugins.

Observer hooks are called after an event has happened; their return values are ignored and an
exception they raise is logged, never propagated into the engine.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("loraserve")


# -- Registration: called once, when the engine (or the CLI) builds its registries ---------------


@hookspec
def loraserve_register_backends(register):
    """Register LoRA kernel backends.

    Called once per engine, after plugins are loaded, to build the backend registry.

    :param register: ``register(name, factory, description="")``. ``factory(settings, device)``
        is called when the backend is chosen with ``--lora-backend NAME`` and returns a
        :class:`loraserve.lora.backend.LoRABackend`.
    :return: nothing.
    """


@hookspec
def loraserve_register_eviction_policies(register):
    """Register adapter eviction policies.

    Called once per engine, after plugins are loaded, to build the eviction-policy registry.

    :param register: ``register(name, factory, description="")``. ``factory()`` is called for
        each tier that evicts (GPU slots, host cache) when the policy is chosen with
        ``--lora-eviction-policy NAME`` and returns a
        :class:`loraserve.lora.eviction.EvictionPolicy`.
    :return: nothing.
    """


@hookspec
def loraserve_register_loaders(register):
    """Register adapter-format loaders.

    Called once per engine, after plugins are loaded, to build the loader registry.

    :param register: ``register(name, factory, description="")``. ``factory()`` returns an
        :class:`loraserve.lora.loader.AdapterLoader`. When an adapter is loaded, each loader's
        ``can_load(source)`` is asked in registration order and the first that accepts loads it.
    :return: nothing.
    """


@hookspec
def loraserve_register_resolvers(register):
    """Register adapter resolvers.

    Called once per engine, after plugins are loaded, to build the resolver registry.

    :param register: ``register(name, factory, description="")``. ``factory(settings)`` returns
        an :class:`loraserve.lora.loader.AdapterResolver`, which maps an adapter name that a request
        uses but nobody loaded to a source the loaders can read, or None.
    :return: nothing.
    """


@hookspec
def loraserve_register_frontends(register):
    """Register HTTP frontends (groups of routes).

    Called once when the HTTP server is built; every registered frontend is mounted.

    :param register: ``register(name, factory, description="")``. ``factory(app, engine,
        settings)`` adds routes to the FastAPI ``app``; its return value is ignored.
    :return: nothing.
    """


@hookspec
def loraserve_register_models(register):
    """Register model architectures.

    Called once per engine, after plugins are loaded, to build the model registry.

    :param register: ``register(name, factory, description="")``. ``name`` is a Hugging Face
        architecture name from ``config.json`` (for example ``LlamaForCausalLM``).
        ``factory(config, dtype, device)`` returns the model module.
    :return: nothing.
    """


# -- Observers: called by the engine after an event --------------------------------------------


@hookspec
def loraserve_adapter_loaded(name, version, source, rank, pinned):
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
def loraserve_adapter_evicted(name, version, tier):
    """An adapter's weights were evicted from one memory tier to make room for another adapter.

    Called after the eviction; the adapter stays registered and is brought back on its next request.

    :param name: the adapter name.
    :param version: the evicted load's version id.
    :param tier: ``"gpu"`` (a batch slot was freed) or ``"host"`` (the host copy was dropped).
    :return: ignored.
    """


@hookspec
def loraserve_adapter_unloaded(name, version):
    """An adapter was unloaded by the user.

    Called after its in-flight requests finished and its host and GPU memory was freed.

    :param name: the adapter name, which new requests can no longer use.
    :param version: the unloaded version id.
    :return: ignored.
    """


@hookspec
def loraserve_request_finished(request_id, adapter, prompt_tokens, completion_tokens, finish_reason):
    """A request finished (completed, stopped, aborted or failed).

    Called once per request, after its KV blocks were freed.

    :param request_id: the engine's id for the request.
    :param adapter: the adapter name, or None for the base model.
    :param prompt_tokens: number of prompt tokens.
    :param completion_tokens: number of generated tokens.
    :param finish_reason: ``"stop"``, ``"length"``, ``"abort"`` or ``"error"``.
    :return: ignored.
    """
