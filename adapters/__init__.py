"""Ways of reaching sherpa-onnx. Each module implements ``bridge.ports.ModelEngine``.

The bridge chooses one by name through ``adapters.registry.create_engine``.
"""
