"""Methods combine with +: which combinations are valid, their canonical spelling, and the config keys
of FitNet and DKD."""

import pytest

from compressor.config import METHODS, DistillConfig, canonical_method, load_config, parse_method, shipped_presets
from compressor.errors import ConfigError


@pytest.mark.parametrize("text, parts", [
    ("none", ()), ("kd", ("kd",)), ("dkd", ("dkd",)), ("at", ("at",)), ("fitnet", ("fitnet",)),
    ("at+kd", ("at", "kd")), ("kd+at", ("at", "kd")), ("fitnet+kd", ("fitnet", "kd")),
    ("at+dkd", ("at", "dkd")), ("DKD+FitNet", ("fitnet", "dkd")), (" at + kd ", ("at", "kd")),
])
def test_valid_methods_parse_feature_term_first(text, parts):
    assert parse_method(text) == parts
    assert canonical_method(text) in METHODS


@pytest.mark.parametrize("text, says", [
    ("kd+dkd", "kd and dkd are both logit distillation"),
    ("at+fitnet", "at and fitnet are both feature distillation"),
    ("at+kd+at", "names at twice"),
    ("kd+kd", "names kd twice"),
    ("none+at", "none cannot be combined"),
    ("crd", "unknown name 'crd'"),
    ("at+", "unknown name ''"),
])
def test_invalid_methods_are_refused_in_one_line(text, says):
    with pytest.raises(ConfigError) as err:
        parse_method(text)
    assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        load_config("cifar", [f"distill.method={text}"])


def test_methods_lists_every_valid_combination_once():
    assert set(METHODS) == {"none", "kd", "dkd", "at", "fitnet", "at+kd", "at+dkd", "fitnet+kd", "fitnet+dkd"}
    assert all(canonical_method(m) == m for m in METHODS)


def test_config_stores_the_canonical_spelling():
    assert load_config("cifar", ["distill.method=kd+at"]).distill.method == "at+kd"
    with pytest.raises(ConfigError, match="write at\\+kd"):
        from compressor.config import Config, _validate

        _validate(Config(distill=DistillConfig(method="kd+at")))


def test_fitnet_and_dkd_defaults_and_their_keys():
    d = load_config("cifar").distill
    assert (d.fitnet_weight, d.fitnet_stage, d.fitnet_regressor, d.fitnet_stage1_epochs) == (100.0, "middle", "auto", 0)
    assert (d.dkd_alpha, d.dkd_beta, d.dkd_temperature, d.dkd_warmup_epochs) == (1.0, 8.0, 4.0, 20)
    d = load_config("cifar", ["distill.fitnet_weight=50", "distill.dkd_beta=6", "distill.fitnet_stage=group2"]).distill
    assert (d.fitnet_weight, d.dkd_beta, d.fitnet_stage) == (50.0, 6.0, "group2")
    imagenet = load_config("imagenet").distill
    assert (imagenet.dkd_beta, imagenet.dkd_temperature, imagenet.dkd_warmup_epochs) == (0.5, 1.0, 1)


def test_every_preset_sets_the_new_keys():
    from importlib import resources

    import tomllib

    for name in shipped_presets():
        raw = tomllib.loads(resources.files("presets").joinpath(f"{name}.toml").read_text())
        missing = {"fitnet_weight", "fitnet_stage", "fitnet_stage1_epochs", "dkd_alpha", "dkd_beta",
                   "dkd_warmup_epochs"} - set(raw["distill"])
        assert not missing, f"{name}: {missing}"


def test_epoch_counts_of_the_method_scale_with_an_overridden_schedule():
    # 20 warm-up epochs of 200 → 2 of 20 and none of 2, as the lr milestones scale; an explicit value stays.
    assert load_config("cifar", ["train.epochs=20"]).distill.dkd_warmup_epochs == 2
    assert load_config("cifar", ["train.epochs=2"]).distill.dkd_warmup_epochs == 0
    assert load_config("cifar", ["train.epochs=2", "distill.dkd_warmup_epochs=5"]).distill.dkd_warmup_epochs == 5
    cfg = load_config("cifar", ["distill.method=fitnet", "distill.fitnet_stage1_epochs=40", "train.epochs=50"])
    assert cfg.distill.fitnet_stage1_epochs == 40  # set together with the epochs: kept


@pytest.mark.parametrize("overrides, says", [
    (["distill.method=fitnet", "train.epochs=3", "distill.fitnet_stage1_epochs=3"], "leaves no epoch"),
    (["distill.fitnet_regressor=sometimes"], "choose auto or always"),
    (["distill.dkd_temperature=0"], "dkd_temperature must be positive"),
    (["distill.dkd_warmup_epochs=-1"], "at least 0"),
])
def test_bad_fitnet_and_dkd_settings_are_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config("cifar", overrides)


def test_any_joined_names_parse_to_a_listed_method_or_a_one_line_refusal():
    from hypothesis import given
    from hypothesis import strategies as st

    names = st.sampled_from(["none", "kd", "dkd", "at", "fitnet", "crd", "", "AT"])

    @given(st.lists(names, min_size=1, max_size=4))
    def check(parts):
        text = "+".join(parts)
        try:
            method = canonical_method(text)
        except ConfigError as exc:
            assert "\n" not in str(exc)
            return
        assert method in METHODS
        assert sorted(method.split("+")) == sorted(p.lower() for p in parts)  # nothing added or lost

    check()
