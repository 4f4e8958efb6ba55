"""`digit-glyphs`: installed fonts whose digits are digits, held out by design, augmented in Ray Data;
`data make-digits` writes every input style from held-out fonts (checked by decoding each style
the way `predict` does)."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_dist.config import load_run_config
from e2e_dist.data.fonts import design_of, digit_fonts, split_fonts
from e2e_dist.data.glyph_augment import CANVAS, augment
from e2e_dist.data.glyphs import plan_glyphs, render_image, render_rows
from e2e_dist.errors import ConfigError


def glyph_cfg(*extra: str):
    return load_run_config("tiny-vision", ["data.source=digit-glyphs", "storage.path=/tmp/unused", *extra])


def test_fonts_with_digits_only_and_clones_are_one_design() -> None:
    fonts = digit_fonts()
    names = {f.key for f in fonts}
    assert len({f.design for f in fonts}) >= 3, names  # at least matplotlib's DejaVu, STIX and Computer Modern
    # symbol fonts render ten different shapes that are not digits; fonts without digits render boxes
    for not_digits in ("cmsy10.ttf", "cmex10.ttf", "D050000L.otf", "STIXSizOneSymReg.ttf", "LastResortHE-Regular.ttf"):
        assert not_digits not in names
    assert "DejaVuSans.ttf" in names and "cmr10.ttf" in names
    assert design_of("Arimo") == design_of("Liberation Sans") == design_of("Nimbus Sans") == "helvetica"
    assert design_of("DejaVu Sans Mono") == design_of("Hack") == "dejavu"
    assert design_of("Lato") == "lato"


def test_held_out_designs_are_whole_and_seeded() -> None:
    fonts = digit_fonts()
    train, held = split_fonts(fonts, 0.25, seed=0)
    assert held and train and len(train) + len(held) == len(fonts)
    assert not {f.design for f in train} & {f.design for f in held}  # no bold or clone of a held-out font trains
    assert split_fonts(fonts, 0.25, seed=0) == (train, held)
    assert split_fonts(fonts, 0.0, seed=0) == (fonts, [])


def test_augmentation_is_seeded_and_covers_both_polarities() -> None:
    from e2e_dist.data.fonts import render_centered
    from PIL import ImageFont

    glyph = render_centered(ImageFont.truetype(digit_fonts()[0].path, 44), "7", CANVAS).astype(np.float32) / 255
    a = augment(glyph, np.random.default_rng(5))
    assert a.shape == (CANVAS, CANVAS) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, augment(glyph, np.random.default_rng(5)))  # a resume renders the same image
    outs = [augment(glyph, np.random.default_rng(s)) for s in range(40)]
    assert len({o.tobytes() for o in outs}) == 40
    borders = [np.median(np.concatenate([o[0], o[-1], o[:, 0], o[:, -1]])) for o in outs]
    assert 8 <= sum(b > 0.5 for b in borders) <= 32  # light paper and dark paper both occur


def test_uneven_light_darkens_as_asked_in_training_and_in_the_held_out_styles() -> None:
    """Training's lights (gradient, shadow, vignette) and the held-out styles' own (an elliptic cast
    shadow, a lamp beside the picture) span 1 - darkening .. 1; augmenting with light on always,
    plain paper comes out darker in places by 10% to GlyphAugment.max_darkening."""
    from e2e_dist.data.glyph_augment import LIGHTS, GlyphAugment, light_field
    from e2e_dist.data.glyph_eval import cast_shadow, lamp_light

    rng = np.random.default_rng(0)
    for kind in LIGHTS:
        for d in (0.1, 0.4):
            f = light_field(40, 30, rng, d, kind)
            assert f.shape == (40, 30) and f.max() == pytest.approx(1, abs=0.02) and f.min() == pytest.approx(1 - d, abs=0.02)
    for _ in range(10):
        shadow, lamp = cast_shadow(96, rng, 0.4), lamp_light(64, rng, 0.3)
        assert shadow.min() == pytest.approx(0.6, abs=0.01) and shadow.max() == pytest.approx(1.0, abs=0.01)
        assert 0.1 <= (shadow < 0.8).mean() <= 0.9  # a shadow over part of the picture, not all of it
        assert lamp.min() == pytest.approx(0.7) and lamp.max() == pytest.approx(1.0)
    lit = GlyphAugment(p_light=1.0, p_low_res=0, p_blur=0, p_noise=0, p_jpeg=0, p_frame=0)
    ratios = [(x.min() / x.max()) for x in (augment(np.zeros((CANVAS, CANVAS), np.float32), np.random.default_rng(s),
                                                     lit) for s in range(60)) if x.max() > 0.2]
    assert ratios and min(ratios) >= 1 - lit.max_darkening - 0.02 and max(ratios) <= 0.9 + 0.02
    assert min(ratios) < 0.6  # strong darkening occurs


def test_plan_rows_exclude_held_out_fonts_and_split_glyphs() -> None:
    cfg = glyph_cfg("data.variants=3")
    plan = plan_glyphs(cfg.data)
    held = {f.key for f in plan.held_out_fonts}
    used = {r["ref"] for r in plan.train_rows + plan.val_rows if r["kind"] == "font"}
    assert held and not used & held and used <= {f.key for f in plan.train_fonts}
    assert len(plan.train_rows) == 3 * plan.train_glyphs
    glyph = lambda r: (r["kind"], r["ref"], r["label"])  # noqa: E731
    assert not {glyph(r) for r in plan.train_rows} & {glyph(r) for r in plan.val_rows}
    assert {r["kind"] for r in plan.train_rows} == {"font", "hand"}  # fonts and the handwritten digits
    assert len({r["seed"] for r in plan.train_rows}) == len(plan.train_rows)  # every copy its own augmentation
    assert plan_glyphs(cfg.data).train_rows == plan.train_rows

    batch = {k: np.array([r[k] for r in plan.train_rows[:6]]) for k in ("kind", "ref", "label", "seed")}
    out = render_rows(batch, size=20, channels=1, augment=True)
    assert out["pixels"].shape == (6, 1, 20, 20) and out["pixels"].dtype == np.float32
    assert -1 <= out["pixels"].min() and out["pixels"].max() <= 1 and list(out["label"]) == list(batch["label"])
    r = plan.train_rows[0]
    img = render_image(r["kind"], r["ref"], r["label"], r["seed"], size=20, augment=True)
    assert np.allclose(out["pixels"][0, 0], img / 255.0 * 2 - 1, atol=1e-6)  # float32 vs float64


def test_bad_configs_are_refused_in_one_line() -> None:
    from e2e_dist.data.glyphs import build_digit_glyphs

    cfg = glyph_cfg()
    with pytest.raises(ConfigError, match="data.paths: source 'digit-glyphs' renders its data"):
        build_digit_glyphs(cfg.data.model_copy(update={"paths": ["/x"]}), model_cfg=cfg.model)
    with pytest.raises(ConfigError, match="model.num_classes=12: source 'digit-glyphs' has 10 classes"):
        build_digit_glyphs(cfg.data, model_cfg=cfg.model.model_copy(update={"num_classes": 12}))
    with pytest.raises(ConfigError, match="data.held_out"):
        glyph_cfg("data.held_out=1.5")


def test_make_digits_writes_every_style_from_held_out_fonts(tmp_path, capsys) -> None:
    from PIL import Image

    from e2e_dist.cli import main
    from e2e_dist.data.glyph_eval import STYLES
    from e2e_dist.input_contract import open_image

    assert main(["data", "make-digits", str(tmp_path / "eval"), "--held-out", "0.25"]) == 0
    out = capsys.readouterr().out
    _, held = split_fonts(digit_fonts(), 0.25, 0)
    assert f"wrote {len(held) * 10 * len(STYLES)} images: {len(held)} held-out fonts" in out
    files = {s: sorted((tmp_path / "eval" / s).glob("*/*")) for s in STYLES}
    assert all(len(f) == len(held) * 10 for f in files.values())
    assert {p.stem.rsplit("-", 1)[0] for p in files["tiny-8"]} == {f.key.rsplit(".", 1)[0] for f in held}
    first = {s: f[0] for s, f in files.items()}
    assert Image.open(first["tiny-8"]).size == (8, 8)
    assert Image.open(first["grey-16bit"]).mode == "I;16"
    assert Image.open(first["transparent-rgba"]).mode == "RGBA"
    assert Image.open(first["letterboxed-jpeg-200x150"]).size == (200, 150)
    sideways = Image.open(first["exif-rotated-jpeg"])
    assert sideways.getexif()[0x0112] == 6
    # Decoded as predict decodes: dark ink on white for the transparent and 16-bit ones, upright for EXIF.
    for style in ("transparent-rgba", "grey-16bit"):
        grey = np.asarray(open_image(first[style].read_bytes()).convert("L"), np.float32)
        assert np.median(grey) > 200 and grey.min() < 60, style
    upright = open_image(first["exif-rotated-jpeg"].read_bytes())
    assert upright.size == (96, 96)
    photo = np.asarray(open_image(first["shadowed-photo-96"].read_bytes()).convert("L"), np.float32)
    paper = np.concatenate([photo[0], photo[-1], photo[:, 0], photo[:, -1]])  # the border: no ink there
    assert photo.shape == (96, 96) and paper.min() < 0.85 * paper.max()  # 20-40% darker in the shadow (seen
    # here without it: > 0.92)
    with pytest.raises(SystemExit):
        main(["data", "make-digits", str(tmp_path / "x"), "--held-out", "1.5"])
    assert "--held-out" in capsys.readouterr().err
