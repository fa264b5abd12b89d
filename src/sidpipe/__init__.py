"""sidpipe: text-to-image personalization experiments with Selectively Informative Descriptions."""

__version__ = "0.1.0"
