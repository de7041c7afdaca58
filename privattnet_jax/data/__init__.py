"""VISPR data: the TFDS builder over the real layout and the synthetic VISPR-format generator."""
