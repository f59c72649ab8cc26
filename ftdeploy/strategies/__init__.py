"""Bundled multi-process strategy configs (DeepSpeed ZeRO-3)."""
