"""edgecds: pick, build and ship a clinical decision-support LLM that fits a device a clinic owns."""

__version__ = "0.1.0"
