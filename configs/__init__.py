"""ml_collections configs: one file per dataset and row of the paper's operator tables (2: DDR,
5: IDRiD), each with `get_config()`."""
