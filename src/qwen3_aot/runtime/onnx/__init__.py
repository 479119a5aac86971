"""The ONNX engine: onnxruntime over model.onnx, static batching."""
