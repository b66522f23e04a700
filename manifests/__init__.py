"""Presets: named recipes of layers kept in high precision, one JSON file each (see presets.py)."""
