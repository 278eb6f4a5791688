"""Shared fixtures: a single-process world (gloo) and the debug model config."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def groups():
    """Process groups of a single-process world (tensor/pipeline/expert/data parallel size 1)."""
    from dsv4.parallel.state import init_distributed

    return init_distributed()


@pytest.fixture()
def debug_cfg():
    """The debug preset's ModelConfig, composed through Hydra."""
    from dsv4.conf.schema import compose_config

    return compose_config("debug").model


def build_model(cfg, groups, seed: int = 0):
    from dsv4.model.transformer import DSV4Model

    torch.manual_seed(seed)
    return DSV4Model(cfg, groups.tp)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One embedded-corpus cache for every test of the session (it takes a few seconds to build)."""
    return str(tmp_path_factory.mktemp("dsv4-cache"))
