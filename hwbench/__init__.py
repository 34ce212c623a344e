"""Measurements on real engines (edgecds.hwbench): load checks now; memory and speed profiles later."""
