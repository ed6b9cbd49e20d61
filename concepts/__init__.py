"""The shared base: concept artifacts, the content-addressed store, base-model loading."""
