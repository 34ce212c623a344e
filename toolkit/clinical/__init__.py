"""Data shipped with edgecds: the clinical case set (CC0) and the drift text."""
