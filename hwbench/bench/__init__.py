"""Development benchmarks and calibration (edgecds.hwbench.bench): not used by the product.

Each module is run by hand on a development machine, as `python -m edgecds.hwbench.bench.<name>`,
and writes its results to bench-results/*.json:

- `bench_quantize`: what `edgecds quantize` adds on top of llama.cpp's converter and quantizer;
- `bench_predict`: the predictor's peak memory and speed against measured ones;
- `bench_profile`: `edgecds profile`'s harness against a bare llama-cpp-python loop and `time -v`;
- `bench_eval`: scoring with the vignette's cache reused, and the drift ordering;
- `bench_onnx`: ONNX variants against GGUF, and edgecds's ONNX runtime against the baselines;
- `bench_serve`: `edgecds serve` under more concurrent clients than slots;
- `bench_fit`: `quantize --fit` against the standard types at equal size;
- `bench_onnx_int4`: onnxruntime's int4 algorithms (k_quant, HQQ, --mixed) against GGUF Q4_K_M;
- `bench_speculative`: decode with and without a speculative draft (model variants, n-gram);
- `calibrate`: measures the predictor's CPU constants, stored in hwbench/calibration.json (the one
  output that the product reads, through `edgecds.hwbench.predict.load_calibrations`).
"""
