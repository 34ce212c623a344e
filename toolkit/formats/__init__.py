"""The model formats as the device reads them: the quant-type table (`types`), the bounded GGUF
header reader (`gguf_file`) and the ONNX folder checks (`onnx_model`). Device side: no torch, no
converter; the build side (quant/) writes these formats and reads them with the same modules."""
