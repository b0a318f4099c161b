"""Models: the catalog (``catalog``), the store that downloads and verifies them (``model_store``,
with ``ort_convert`` for Moonshine's files), the engine that serves the loaded one and the switch
(``engine_manager``, ``engine_factory``: ``ENGINE_ADAPTER`` to an adapter) and the speed check
(``speed_check``). The group imports nothing of the bridge but ``bridge.ports``, ``bridge.config``
and ``bridge.metrics``."""
