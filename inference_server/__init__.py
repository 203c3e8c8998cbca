"""The gRPC inference core around a llama.cpp chat model."""
