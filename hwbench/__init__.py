"""Measurements on real engines (edgecds.hwbench): load checks, one variant measured in a fresh process, the predictor, benchmarks."""
