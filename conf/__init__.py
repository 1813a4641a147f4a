"""Hydra configuration tree (YAML only). A package so that installed console scripts locate it with
`config_path` relative to this directory."""
