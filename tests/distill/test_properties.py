"""Property and fuzz tests: the attention map and AT loss, and preset/option parsing.

AT: the map is non-negative with unit norm, unchanged by a positive rescaling of the activation
(per sample), and the loss is non-negative, symmetric and zero when the maps agree. Parsing:
random overrides and random TOML either give a ``Config`` that satisfies the documented
invariants or raise ``ConfigError`` with a one-line message, never any other exception.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.config import ATTENTIONS, METHODS, SECTIONS, Config, load_config, parse_overrides
from compressor.distill.losses import at_loss, attention_map, kd_loss, match_spatial
from compressor.errors import ConfigError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- attention maps and the AT loss -----------------------------------------------------------


@st.composite
def activations(draw, batch=None, channels=None, size=None):
    b = batch or draw(st.integers(1, 3))
    c = channels or draw(st.integers(1, 4))
    h, w = size or (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-1, 1.0, 10.0]))
    a = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    a[:, 0, 0, 0] = a[:, 0, 0, 0].sign().where(a[:, 0, 0, 0] != 0, torch.ones(b, dtype=a.dtype)) * scale  # no all-zero sample
    return a.float()


P = st.sampled_from([1.0, 2.0, 3.0])
REDUCE = st.sampled_from(["mean", "max"])
FORM = st.sampled_from(["code", "paper"])


@SETTINGS
@given(activations(), P, REDUCE)
def test_attention_map_is_non_negative_with_unit_norm(a, p, reduce):
    q = attention_map(a, p, reduce)
    assert q.shape == (a.shape[0], a.shape[2] * a.shape[3])
    assert (q >= 0).all()
    assert torch.allclose(q.norm(dim=1), torch.ones(a.shape[0]), atol=1e-5)


@SETTINGS
@given(activations(), P, REDUCE, st.lists(st.floats(1e-2, 1e2), min_size=3, max_size=3))
def test_attention_map_ignores_positive_rescaling_per_sample(a, p, reduce, factors):
    c = torch.tensor(factors[: a.shape[0]], dtype=a.dtype).view(-1, 1, 1, 1)
    assert torch.allclose(attention_map(c * a, p, reduce), attention_map(a, p, reduce), atol=1e-5)


@SETTINGS
@given(st.data(), P, REDUCE, FORM)
def test_at_loss_is_non_negative_and_symmetric(data, p, reduce, form):
    b = data.draw(st.integers(1, 3))
    s = data.draw(activations(batch=b))
    t = data.draw(activations(batch=b))  # other channels and, often, another spatial size: pooled to the smaller
    st_loss, ts_loss = at_loss(s, t, p, form, reduce), at_loss(t, s, p, form, reduce)
    assert st_loss >= 0 and math.isfinite(float(st_loss))
    assert torch.allclose(st_loss, ts_loss, rtol=1e-5, atol=1e-7)


@SETTINGS
@given(activations(), st.floats(1e-2, 1e2), P, REDUCE, FORM)
def test_at_loss_is_zero_when_the_maps_agree(a, factor, p, reduce, form):
    assert float(at_loss(a, a, p, form, reduce)) == 0.0
    assert float(at_loss(factor * a, a, p, form, reduce)) == pytest.approx(0.0, abs=1e-5)  # rescaled: same map


@st.composite
def differing_pairs(draw):
    """Two activations with the same batch whose maps (after pooling to the smaller size) differ, by construction:
    ``s`` is random with at least two positions; ``t`` is zero but for a block, at an integer multiple of
    ``s``'s size, that pools onto the position where ``s``'s map is lowest. ``t``'s map is then one-hot there,
    while ``s``'s map has its smallest entry there, at most 1/sqrt(H·W) <= 0.71: they differ by > 0.29."""
    b = draw(st.integers(1, 3))
    h, w = draw(st.tuples(st.integers(1, 5), st.integers(1, 5)).filter(lambda hw: hw[0] * hw[1] >= 2))
    s = draw(activations(batch=b, size=(h, w)))
    p = draw(P)
    my, mx, ct = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    k = attention_map(s, p).argmin(dim=1)
    t = torch.zeros(b, ct, h * my, w * mx)
    for i in range(b):
        y, x = divmod(int(k[i]), w)
        t[i, draw(st.integers(0, ct - 1)), y * my:(y + 1) * my, x * mx:(x + 1) * mx] = draw(st.sampled_from([-5.0, 0.5, 3.0]))
    return (t, s, p) if draw(st.booleans()) else (s, t, p)


@SETTINGS
@given(differing_pairs())
def test_at_loss_is_positive_when_the_maps_differ(pair):
    s, t, p = pair
    ps, pt = match_spatial(s, t)
    assert (attention_map(ps, p) - attention_map(pt, p)).abs().max() > 0.29  # the construction holds
    assert float(at_loss(s, t, p)) > 0


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.5, 8.0))
def test_kd_loss_is_non_negative_and_zero_for_equal_logits(b, k, seed, T):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, k, generator=g) * 3, torch.randn(b, k, generator=g) * 3
    assert float(kd_loss(s, t, T)) >= -1e-6
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-5)


# --- presets and options ----------------------------------------------------------------------

KEYS = {section: [f.name for f in fields(cls)] for section, cls in SECTIONS.items()}
VALUES = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4), st.sampled_from(list(METHODS) + list(ATTENTIONS)),
)
SECTION_NAMES = st.one_of(st.sampled_from(list(SECTIONS)), st.from_regex(r"[a-z_]{1,8}", fullmatch=True))


@st.composite
def overrides(draw):
    out: dict[str, dict] = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(SECTION_NAMES)
        key = draw(st.one_of(st.sampled_from(KEYS.get(section, ["epochs"])), st.from_regex(r"[a-z_]{1,10}", fullmatch=True)))
        out.setdefault(section, {})[key] = draw(VALUES)
    return out


def _check_invariants(cfg: Config) -> None:
    d, t = cfg.distill, cfg.train
    assert d.method in METHODS and d.attention in ATTENTIONS and d.at_form in ("code", "paper")
    assert 0 <= d.alpha <= 1 and d.temperature > 0 and d.p > 0 and d.beta >= 0 and math.isfinite(d.beta)
    assert t.epochs >= 1 and t.batch_size >= 1 and t.lr > 0 and math.isfinite(t.lr) and t.seed >= 0
    assert all(isinstance(m, int) and m >= 0 for m in t.milestones)
    assert cfg.data.image_size >= 8 and isinstance(cfg.data.flip, bool)
    assert cfg.student.blocks_per_stage >= 1 and 0 < cfg.student.width_ratio <= 1


def _is_one_line(exc: ConfigError, *user_text) -> bool:
    """One line, the user's text included: a message quotes it with escapes (``repr``), so a newline
    the user typed shows as ``\\n`` (issue 21, point 11)."""
    message = str(exc)
    return "\n" not in message and "\r" not in message and len(message.strip()) > 10


@SETTINGS
@given(st.sampled_from(["cifar", "demo", "imagenet"]), overrides())
def test_random_overrides_give_a_valid_config_or_a_config_error(preset, values):
    try:
        cfg = load_config(preset, values)
    except ConfigError as exc:
        assert _is_one_line(exc, *(v for items in values.values() for v in items.values()))
        return
    _check_invariants(cfg)
    for section, items in values.items():  # every accepted override is what the config holds
        for key, value in items.items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(got, (int, float)):
                assert got == value


@SETTINGS
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30), max_size=4))
def test_random_set_strings_parse_or_raise_config_error(items):
    try:
        cfg = load_config("demo", parse_overrides(items))
    except ConfigError as exc:
        assert _is_one_line(exc, *items, *(part for item in items for part in item.partition("=")[::2]))
        return
    _check_invariants(cfg)


@SETTINGS
@given(st.sampled_from(sorted(k for s in KEYS for k in (f"{s}.{n}" for n in KEYS[s]))), VALUES)
def test_set_key_value_strings(key, value):
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    try:
        cfg = load_config("demo", [f"{key}={text}"])
    except ConfigError as exc:
        assert _is_one_line(exc, text, f"{key}={text}")
        return
    _check_invariants(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    return str(v)


def _toml(doc: dict) -> str:
    lines = [f'description = {json.dumps(doc.pop("description", "random"))}']
    for section, items in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


@SETTINGS
@given(overrides())
def test_random_toml_presets_load_or_raise_config_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("toml") / "random.toml"
    path.write_text(_toml(doc))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert _is_one_line(exc, *(v for items in doc.values() if isinstance(items, dict) for v in items.values()))
        return
    _check_invariants(cfg)
    assert cfg.preset == "random"


@SETTINGS
@given(st.text(max_size=200))
def test_random_text_as_a_preset_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("raw") / "junk.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    _check_invariants(cfg)


def test_a_preset_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("description = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_milestones_take_a_comma_list_with_or_without_brackets():
    for text in ("8,12", "[8,12]", "[8, 12]"):
        assert load_config("cifar", [f"train.milestones={text}", "train.epochs=15"]).train.milestones == (8, 12)
    with pytest.raises(ConfigError, match=r"a comma list of whole numbers, e.g. train.milestones=60,120,160, got 'a,b'"):
        load_config("cifar", ["train.milestones=a,b"])
