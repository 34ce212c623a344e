"""A bundle: the one variant a clinic's device runs, packed so that the device can check it.

One module a concept:
- `layout`: what a bundle holds (file names, the manifest's schema, `runtime.json` as a dataclass);
- `choose`: which variant, from results.json files, for a device and the clinic's constraints;
- `pack`: writing the folder, the model card and the reproducible archive;
- `sign`: ed25519 keys and the manifest's signature;
- `verify`: checking a folder or an archive byte for byte against its manifest;
- `run`: answering a prompt offline with a bundle's model and settings (`serve` serves it).
"""
