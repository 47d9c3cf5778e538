"""The `specwire` command and the local draft+target pair: the layer above both nodes."""
