"""IDRiD and DDR: TFDS builders over the real downloads, synthetic downloads, and the grain pipelines.

Import the module you need (`sources`, `pipeline`, `prepare`, `transforms`, ...): this file imports
nothing, so reaching `transforms` does not load TFDS.
"""
