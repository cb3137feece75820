"""The engine in a process of its own: the HTTP server's side (:class:`~loraserve.ipc.client.RemoteEngine`)
and the engine process's side (:mod:`~loraserve.ipc.engine_process`), talking over ZeroMQ sockets with
msgpack messages (:mod:`~loraserve.ipc.messages`)."""
