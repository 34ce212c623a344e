"""The `edgecds` commands, defined standalone and registered on the group in `edgecds.cli`.

- `common`: what the commands share: `print_json`, `table`, the `--profiles-dir` and `--device`
  options, and `constraint_options` (bundle's choice rules, shared by report).
- `build`: the build machine's commands: `quantize`, `types`, `models` (list, pull), `inspect`.
- `device`: the commands about and on the target device: `devices` (list, detect, show), `plan`,
  `profile`, `eval`.
- `ship`: what goes to the clinic and runs there: `report`, `bundle`, `keygen`, `verify`, `run`,
  `serve`.

Each command parses its options, calls one library function and renders its result; heavy imports
happen inside the command, so the device-side commands never load torch or transformers. No module
here imports `edgecds.cli`.
"""
