"""dsv4.model: the DeepSeek-V4 architecture, Megatron-style (see model/transformer.py for the map)."""
