"""dsv4.conf: Hydra schemas (conf/schema.py) and YAML presets (conf/model/*.yaml)."""
