"""mvp-bridge: the OpenAI audio API in front of a supervised sherpa-onnx engine."""
