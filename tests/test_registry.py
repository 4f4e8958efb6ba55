"""The registries find entries by entry point, import path or in-process registration - and the
built-ins still when e2e-dist runs from a checkout without its package metadata (cluster nodes put
the checkout on the path) while a plug-in package is installed next to it."""

from __future__ import annotations

from importlib import metadata

from e2e_dist import registry
from e2e_dist.models.registry import MODELS


def test_builtins_are_found_without_our_metadata_beside_an_installed_plugin(monkeypatch):
    plugin = metadata.EntryPoint(name="vit", value="tests.test_plugin_check:build_mlp", group="e2e_dist.models")
    real = metadata.entry_points

    def only_the_plugin(**kw):
        return [plugin] if kw.get("group") == "e2e_dist.models" else [
            ep for ep in real(**kw) if not ep.value.startswith("e2e_dist.")]

    monkeypatch.setattr(registry.metadata, "entry_points", only_the_plugin)
    assert MODELS.get("gpt").__name__ == "build_gpt"  # imported from the package's own modules
    assert MODELS.get("vit").__name__ == "build_mlp"
    assert {"gpt", "resnet", "ctc-speech", "vit"} <= set(MODELS.names())
    assert registry.declared_builtin("e2e_dist.data_sources", "digits")
    assert not registry.declared_builtin("e2e_dist.models", "vit")


def test_the_installed_package_declares_every_builtin():
    from e2e_dist.data.registry import SOURCES

    sources = {"text", "stdlib-text", "digits", "image-folder", "image-parquet", "digit-glyphs", "speech-manifest",
               "spoken-digits"}
    assert {"gpt", "resnet", "ctc-speech"} <= set(registry.entry_point_names("e2e_dist.models"))
    assert sources <= set(registry.entry_point_names("e2e_dist.data_sources"))
    for name in sources:  # each entry point loads the source's builder
        assert SOURCES.get(name).__module__.startswith("e2e_dist.data.")
