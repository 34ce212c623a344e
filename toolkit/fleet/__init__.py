"""`edgecds fleet`: profile and evaluate variants on many devices at once, through a Ray cluster.

A hospital group's devices join one Ray cluster (`fleet join`), each labelled with the device
profile it is (a Ray custom resource, `edgecds-device:<id>`). The build machine then runs one Ray
task per (device kind, variant) on a node of that kind; the variant's files travel by content and
are checked on arrival; the node measures with the same code `profile` and `eval` run locally, and
the records are merged into the build machine's results.json as they arrive.

- cluster.py: Ray's settings (nothing beyond the named cluster), head/join/status.
- transfer.py: files by content (the build machine serves, the node fetches and checks).
- node.py: what a task does on the node.
- run.py: the build machine's side: plan, schedule, retry, merge, resume.
"""
