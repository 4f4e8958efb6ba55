"""An e2e-dist plug-in: `vit` (a small Vision Transformer on pixels) and `image-table` (images
listed in a CSV file with their labels). The contract both keep: e2e-dist's docs/plugins.md.

Nothing is imported here: e2e-dist imports `vit_plugin.model` / `vit_plugin.data` itself when a
config names them, and the data source is used without torch on the driver's config check.
"""
