"""The product's top layer: the `adselect` command line, which wires server/ and eval/ over the selection core."""
