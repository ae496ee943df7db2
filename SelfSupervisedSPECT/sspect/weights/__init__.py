"""Pretrained networks that ship with the engine, as safetensors files (weights and a text header; never pickle)."""
