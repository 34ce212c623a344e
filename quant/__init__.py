"""Format conversions and quantizers (edgecds.quant): the quant-type table and the engines' wrappers."""
