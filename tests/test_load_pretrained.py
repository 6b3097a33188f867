"""Learner.load_pretrained, how a curriculum stage restarts from the best weights (a model folder):
the folder's weights down to ZeRO's fp32 master copy, and fresh Adam moments, so that the next
update is a new learner's from that folder, also after a checkpoint taken before any update."""

import pytest
import torch
from safetensors.torch import load_file

from common.config import AlgoConfig
from learner.deepspeed_learner import Learner
from tests.test_learner import config, make_groups, model_dir  # noqa: F401 (model_dir: a fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [2, 3])
def test_a_loaded_folder_updates_like_a_new_learner_from_it(ray_local, model_dir, tmp_path, stage):  # noqa: F811
    algo = AlgoConfig(kl_beta=0.0)  # no reference: a new learner's would be the folder, not the base model
    cfg = config(zero_stage=stage)
    best = tmp_path / "best"
    with Learner(model_dir, algo, cfg, seed=1) as lrn:
        lrn.train(make_groups(lrn, seed=1)[0])
        lrn.save_pretrained(str(best))
        lrn.train(make_groups(lrn, seed=2)[0])  # away from the folder, with Adam moments
        version, calls = lrn.version, lrn.train_calls
        lrn.load_pretrained(str(best))
        assert (lrn.version, lrn.train_calls) == (version + 1, calls)  # a new version; the shuffle runs on
        state = lrn.state_dict()
        assert all(torch.equal(state[k], v) for k, v in load_file(best / "model.safetensors").items())
        lrn.save_checkpoint(str(tmp_path), "restart")  # holds no Adam state at all
        tables, _ = make_groups(lrn, seed=3)
        # Had the fp32 master copy kept the old weights, this step would start from them.
        loaded = lrn.train(tables), lrn.state_dict()
    with Learner(str(best), algo, cfg, seed=1) as fresh:
        fresh.train_calls = calls  # the loaded learner's shuffle of the rows
        new = fresh.train(tables), fresh.state_dict()
        fresh.load_checkpoint(str(tmp_path), "restart")
        resumed = fresh.train(tables), fresh.state_dict()
    for metrics, weights in (new, resumed):
        for k in ("loss", "pg_loss", "clip_frac", "grad_norm"):
            assert metrics[k] == pytest.approx(loaded[0][k], rel=1e-5, abs=1e-7), k
        assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in loaded[1].items())
