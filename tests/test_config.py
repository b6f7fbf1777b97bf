import tomllib

import pytest

from shared.config import ConfigError, RunConfig
from tests.conftest import REPO_ROOT


def test_pyproject_defaults_equal_dataclass_defaults() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    from flwr.common.config import flatten_dict

    flat = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert flat == RunConfig().to_flat()
    assert RunConfig.from_flat(flat) == RunConfig()


def test_override_reaches_nested_field() -> None:
    cfg = RunConfig.from_flat({"model.d-model": 96, "train.lr": 1, "strategy.name": "fedadam"})
    assert cfg.model.d_model == 96
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.strategy.name == "fedadam"
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="'model.d-modle'"):
        RunConfig.from_flat({"model.d-modle": 96})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match="'train.local-steps' must be int, got '8'"):
        RunConfig.from_flat({"train.local-steps": "8"})
    with pytest.raises(ConfigError, match="'synth' is a section"):
        RunConfig.from_flat({"synth": 3})


def test_conv_kernel_reaches_the_transformer_blocks_and_is_checked() -> None:
    from shared.models.checkpoint import build_model
    from shared.models.transformer import CausalConvModule

    cfg = RunConfig.from_flat({"model.conv-kernel": 7, "model.num-layers": 2})
    kernels = [m.kernel_size for m in build_model(cfg.model).modules() if isinstance(m, CausalConvModule)]
    assert kernels == [7, 7]
    assert not any(isinstance(m, CausalConvModule) for m in build_model(RunConfig().model).modules())
    with pytest.raises(ConfigError, match="model.conv-kernel must be >= 0, got -1"):
        RunConfig.from_flat({"model.conv-kernel": -1})
    with pytest.raises(ValueError, match="the amortized encoder has no convolution module"):
        build_model(RunConfig.from_flat({"model.conv-kernel": 7, "model.name": "amortized"}).model)
