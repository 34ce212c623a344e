"""edgecds: pick, build and ship a clinical decision-support LLM that fits a device a clinic owns."""

import os as _os

__version__ = "0.1.0"

# Nothing leaves the device. onnxruntime 1.29+ sends telemetry from Linux too (a device id and an
# events database under ~/.cache/Microsoft, uploads to its vendor); ORT_DISABLE_TELEMETRY=1 set
# before onnxruntime initializes turns all of it off, in this process and the children it starts.
# It is set on importing edgecds, whatever the environment said: a clinical tool does not opt in.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"
