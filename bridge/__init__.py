"""mvp-bridge: the OpenAI audio API in front of a supervised sherpa-onnx engine."""

import os

# onnxruntime (the VAD's runtime) sends usage telemetry to Microsoft from Linux since 1.32, and keeps
# a device id and an event store under ~/.cache/Microsoft and a file in the temp folder. A
# self-hosted server sends nothing anywhere: off unless the operator sets ORT_DISABLE_TELEMETRY=0.
# It must be set before onnxruntime is first imported, so it is set here, with the package; child
# processes (the engine, the decoder workers) inherit it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
