"""LightningDataModules: image shards for phase 1 (`image_shards`), the feature cache for phase 2 (`cached_features`).

Nothing is imported here: `shards` and the other plain commands use this package's modules without Lightning
(seconds of start-up); `cli.lightning_cli` imports the two data modules, which lets YAML name them bare.
"""
