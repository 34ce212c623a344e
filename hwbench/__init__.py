"""Measurements on real engines (edgecds.hwbench).

What the product runs on the device stays here: the load check (`load_check.py`), one variant
measured in a fresh process (`measure.py`), the memory and speed predictor (`predict.py`) and its
constants (`calibration.json`). Development benchmarks and the calibration script that measures
those constants are in `bench/` (`edgecds.hwbench.bench`), not used by the product.
"""
