"""The forwards: the compiled graph (or its tensor-parallel ranks), the KV cache tensors it writes, CUDA graphs of its decode steps."""
