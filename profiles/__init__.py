"""Device profiles shipped with edgecds (data: one TOML file per device; see edgecds.devices)."""
