"""lalm-probe core: engine, plugin interfaces, registry, store and CLI."""
