"""ml_collections configs: one file per dataset and variant, each with `get_config()`."""
