"""Sharded checkpoints (dsv4.train.checkpoint): exact resume, resharding to other layouts, and bad checkpoints.

Exact resume: a run of N steps and a run stopped at k and resumed to N log bit-identical losses (metrics.jsonl), on
one process and on tp2 x pp2, with AdamW (megatron-core's distributed optimizer) and Muon. Resharding: a checkpoint
saved under one layout loads under others; the validation loss right after loading equals the one measured before
saving, and the next steps follow the source run (to 2e-4: other layouts sum in another order). Faults with killed
processes are in test_checkpoint_faults.py.
"""

import json
import os
import pickle
import shutil

import pytest
import torch

from dist_utils import run_workers
from run_logs import logged_losses as _losses

COMMON = ["run.progress_bar=false", "optim.warmup_steps=2", "run.steps=6", "run.save_interval=3",
          "run.eval_interval=3", "run.eval_iters=4", "data.global_batch_size=4"]


def _cfg(cache_dir, run_dir, overrides, world_size=1):
    from dsv4.conf.schema import compose_config

    return compose_config("debug", [f"data.cache_dir={cache_dir}", f"run.output_dir={run_dir}", *COMMON,
                                    *overrides], world_size=world_size)


def _train(rank, world_size, cache_dir, run_dir, overrides, result_file=None):
    """A worker: dsv4's training loop on this layout; rank 0 writes the evaluations to `result_file`."""
    from dsv4.train.loop import train

    result = train(_cfg(cache_dir, run_dir, overrides, world_size), run_dir=run_dir)
    if rank == 0 and result_file:
        with open(result_file, "w") as f:
            json.dump({str(k): v for k, v in result.evaluations.items()}, f)


def _load_and_evaluate(rank, world_size, cache_dir, run_dir, checkpoint, overrides, result_file):
    """A worker: build this layout, load `checkpoint`, evaluate at once (rank 0 writes it), then train on."""
    from dsv4.parallel.state import init_distributed
    from dsv4.train import loop
    from dsv4.train.checkpoint import load_checkpoint
    from dsv4.train.data import build_data

    cfg = _cfg(cache_dir, run_dir, overrides, world_size)
    p = cfg.parallel
    groups = init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, vpp=p.vpp)
    chunks = loop.build_model(cfg, groups)
    optimizer = loop.build_optimizer(chunks, cfg, groups)
    data = build_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    step = load_checkpoint(checkpoint, chunks, optimizer, data.train, cfg, groups)
    for chunk in chunks:
        loop.unwrap(chunk).set_step(step)
    valid = loop.evaluate(chunks, data.valid(), cfg, groups)
    del chunks, optimizer
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump({"step": step, "consumed": data.train.consumed_samples, "valid": valid}, f)
    loop.train(cfg, run_dir=run_dir)  # resumes from the same checkpoint (run.resume) and trains to the end


def _resume_copy(src, dst, keep_step):
    """A copy of run folder `src` as if the run had died right after step `keep_step`'s checkpoint."""
    shutil.copytree(src, dst)
    root = os.path.join(dst, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step_") and int(name[5:13]) > keep_step:
            shutil.rmtree(os.path.join(root, name))
    os.remove(os.path.join(root, "latest"))
    os.remove(os.path.join(dst, "metrics.jsonl"))


# --- exact resume ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,layout", [
    (1, ["optim=adamw"]),
    (1, ["optim=muon"]),
    (4, ["optim=muon", "parallel.tp=2", "parallel.pp=2", "data.micro_batch_size=1"]),
    (4, ["optim=adamw", "parallel.tp=2", "parallel.pp=2", "data.micro_batch_size=1"]),
    # saved in the indexer warm-up (step 0 dense, 1-3 warm-up): the frozen tensors' own AdamW step counts
    (1, ["optim=adamw", "model.dense_attention_steps=1", "model.indexer_warmup_steps=3"]),
    (1, ["optim=muon", "model.dense_attention_steps=1", "model.indexer_warmup_steps=3"]),
], ids=["single-adamw", "single-muon", "tp2pp2-muon", "tp2pp2-adamw", "single-adamw-warmup", "single-muon-warmup"])
def test_resume_is_bit_identical(cache_dir, tmp_path, world_size, layout):
    full = str(tmp_path / "full")
    run_workers(_train, world_size, cache_dir, full, layout, timeout=600)
    resumed = str(tmp_path / "resumed")
    _resume_copy(full, resumed, keep_step=3)
    run_workers(_train, world_size, cache_dir, resumed, layout, timeout=600)
    want, got = _losses(full), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]  # bit-identical


# --- resharding ------------------------------------------------------------------------------------------------------

RESHARD = {
    # source layout (world, overrides) -> target layouts; every layout evaluates the same validation samples
    # (run.eval_iters x micro_batch_size, whatever the data-parallel size)
    "tp2pp2-to-dp4-and-single": ((4, ["parallel.tp=2", "parallel.pp=2", "data.micro_batch_size=1"]),
                                 [(4, ["data.micro_batch_size=1"]),
                                  (1, ["data.micro_batch_size=4", "run.eval_iters=1"])]),
    "ep2-to-ep1": ((2, ["parallel.ep=2", "data.micro_batch_size=2"]),
                   [(1, ["data.micro_batch_size=2"])]),
    "muon-tp2-to-dp2": ((2, ["optim=muon", "parallel.tp=2", "data.micro_batch_size=2"]),
                        [(2, ["optim=muon", "data.micro_batch_size=2"])]),
}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_checkpoint_loads_under_other_layouts(cache_dir, tmp_path, case):
    (world, layout), targets = RESHARD[case]
    source = str(tmp_path / "source")
    run_workers(_train, world, cache_dir, source, layout, str(tmp_path / "source.json"), timeout=600)
    with open(tmp_path / "source.json") as f:
        before = json.load(f)["3"]  # evaluated at step 3, before that step's checkpoint was saved
    want = _losses(source)
    checkpoint = os.path.join(source, "checkpoints", "step_00000003")
    for i, (t_world, t_layout) in enumerate(targets):
        target = str(tmp_path / f"target{i}")
        result = str(tmp_path / f"target{i}.json")
        run_workers(_load_and_evaluate, t_world, cache_dir, target, checkpoint,
                    [*t_layout, f"run.resume={checkpoint}"], result, timeout=600)
        with open(result) as f:
            after = json.load(f)
        assert after["step"] == 3 and after["consumed"] == 3 * 4
        assert after["valid"]["valid/lm_loss"] == pytest.approx(before["valid/lm_loss"], rel=1e-5, abs=0)
        got = _losses(target)
        assert sorted(got) == [4, 5, 6]
        for s in (4, 5, 6):  # model and optimizer state both arrived: the run goes on as it would have
            assert got[s] == pytest.approx(want[s], rel=2e-4), (t_layout, s)


def test_loader_continues_every_sample_once_across_a_data_parallel_change():
    from dsv4.train.data import TrainLoader

    dataset = [{"tokens": torch.tensor([i]), "labels": torch.tensor([i]), "loss_mask": torch.ones(1)}
               for i in range(64)]
    one = TrainLoader(dataset, micro_batch_size=2, dp_rank=0, dp_size=1)
    seen = [int(x) for _ in range(6) for x in next(one)["input_ids"].flatten()]  # 3 steps of 4 samples
    state = one.state_dict()
    ranks = [TrainLoader(dataset, micro_batch_size=1, dp_rank=r, dp_size=4) for r in range(4)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(5):
        seen += [int(x) for loader in ranks for x in next(loader)["input_ids"].flatten()]
    assert seen == list(range(32))


# --- bad checkpoints -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(cache_dir, tmp_path_factory):
    """A world-1 run folder with complete checkpoints at steps 3 and 6 (not to be modified: copy it)."""
    run_dir = str(tmp_path_factory.mktemp("ckpt") / "run")
    run_workers(_train, 1, cache_dir, run_dir, [], timeout=600)
    return run_dir


def _snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _expect_load_error(rank, world_size, cache_dir, run_dir, overrides, expected_parts):
    """A worker: the run must stop with a CheckpointError whose message has every part of `expected_parts`."""
    from dsv4.train.checkpoint import CheckpointError
    from dsv4.train.loop import train

    with pytest.raises(CheckpointError) as info:
        train(_cfg(cache_dir, run_dir, overrides, world_size), run_dir=run_dir)
    for part in expected_parts:
        assert part in str(info.value), (part, str(info.value))


def _bad_copy(saved_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(saved_run, run_dir)
    return run_dir, os.path.join(run_dir, "checkpoints", "step_00000006")


def _verify_error(ckpt) -> str:
    """The CheckpointError message of verifying checkpoint folder `ckpt` (in this process, no process group)."""
    from dsv4.train.checkpoint import CheckpointError, read_record, verify_files

    with pytest.raises(CheckpointError) as info:
        verify_files(ckpt, read_record(ckpt))
    return str(info.value)


class _Planted:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dotted_global(marker) -> bytes:
    """A pickle that calls os.system through an allowed module's attribute path (STACK_GLOBAL of
    `torch.distributed.checkpoint.filesystem` / `os.system`): an allow-list by module alone would run it."""
    def text(s):
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return (b"\x80\x04" + text("torch.distributed.checkpoint.filesystem") + text("os.system") + b"\x93"
            + text(f"touch {marker}") + b"\x85R.")


def _plant(ckpt, victim, marker, payload=None):
    """Replace `victim` with a malicious pickle and record its hash, as a forger who rewrites dsv4.json would."""
    import hashlib

    path = os.path.join(ckpt, victim)
    with open(path, "wb") as f:
        if payload is None:
            pickle.dump(_Planted(str(marker)), f)
        else:
            f.write(payload)
    with open(os.path.join(ckpt, "dsv4.json")) as f:
        record = json.load(f)
    with open(path, "rb") as f:
        record["files"][victim] = {"sha256": hashlib.sha256(f.read()).hexdigest(), "bytes": os.path.getsize(path)}
    with open(os.path.join(ckpt, "dsv4.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.parametrize("victim,dotted", [(".metadata", False), (".metadata", True), ("common.pt", False),
                                           ("common.pt", True)])
def test_planted_pickle_is_refused_without_running_it(saved_run, tmp_path, victim, dotted):
    _, ckpt = _bad_copy(saved_run, tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt, victim, marker, _dotted_global(marker) if dotted else None)
    message = _verify_error(ckpt)
    assert victim in message and "refused" in message
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(saved_run, tmp_path, damage):
    _, ckpt = _bad_copy(saved_run, tmp_path)
    shard = sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))[0]
    path = os.path.join(ckpt, shard)
    if damage == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            if damage == "flip":
                data[len(data) // 2] ^= 0xFF
            else:
                data = data[: len(data) // 2]
            f.seek(0)
            f.truncate()
            f.write(data)
    message = _verify_error(ckpt)
    assert shard in message
    assert {"flip": "corrupted", "truncate": "truncated", "delete": "missing"}[damage] in message


@pytest.mark.parametrize("overrides,parts", [
    (["model.rope_theta=20000.0"], ["model.rope_theta", "checkpoint 10000.0", "this run 20000.0"]),
    (["model.moe_intermediate_size=64"], ["model.moe_intermediate_size", "checkpoint 32", "this run 64"]),
    (["optim=muon"], ["optimizer adamw-distributed", "this run uses muon"]),
    (["parallel.distributed_optimizer=false"], ["optimizer adamw-distributed", "this run uses adamw"]),
    (["run.seed=7"], ["seed: checkpoint 1234, this run 7", "exactly once"]),
    (["run.steps=12"], ["train_samples", "run.steps"]),
])
def test_checkpoint_of_another_run_is_refused_with_the_difference(cache_dir, saved_run, overrides, parts):
    from dsv4.train.checkpoint import CheckpointError, check_compatible, read_record

    ckpt = os.path.join(saved_run, "checkpoints", "step_00000006")
    cfg = _cfg(cache_dir, "unused", overrides)
    with pytest.raises(CheckpointError) as info:
        check_compatible(ckpt, read_record(ckpt), cfg)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_a_bad_checkpoint_stops_the_run_and_changes_nothing(cache_dir, saved_run, tmp_path):
    """Through the training loop: a corrupt shard, a planted pickle and another model each stop the run with a
    CheckpointError before anything in the run folder is written."""
    run_dir, ckpt = _bad_copy(saved_run, tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt, ".metadata", marker)
    before = _snapshot(run_dir)
    run_workers(_expect_load_error, 1, cache_dir, run_dir, [], [".metadata", "refused"])
    assert not marker.exists()
    assert _snapshot(run_dir) == before


def test_torn_checkpoints_are_never_chosen(saved_run, tmp_path):
    from dsv4.train.checkpoint import CheckpointError, resolve_resume

    run_dir, newest = _bad_copy(saved_run, tmp_path)
    root = os.path.join(run_dir, "checkpoints")
    os.remove(os.path.join(newest, "dsv4.json"))  # died before the completion mark
    os.makedirs(os.path.join(root, "step_00000009.partial"))  # died while writing
    assert resolve_resume("auto", run_dir) == os.path.join(root, "step_00000003")  # `latest` names a torn one
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000009")
    assert resolve_resume("auto", run_dir) == os.path.join(root, "step_00000003")
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(newest, run_dir)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "nowhere"), run_dir)
    assert resolve_resume("none", run_dir) is None
    assert resolve_resume("auto", str(tmp_path / "fresh")) is None
    assert resolve_resume(run_dir, str(tmp_path / "other")) == os.path.join(root, "step_00000003")


def test_keep_last_and_async_save(cache_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    run_workers(_train, 1, cache_dir, run_dir, ["run.save_interval=1", "run.keep_last=2", "run.async_save=true"],
                timeout=600)
    root = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_00000005", "step_00000006"]
    with open(os.path.join(root, "latest")) as f:
        assert f.read() == "step_00000006"
    resumed = str(tmp_path / "resumed")
    _resume_copy(run_dir, resumed, keep_step=5)
    run_workers(_train, 1, cache_dir, resumed, ["run.save_interval=1", "run.async_save=true"], timeout=600)
    assert _losses(resumed)[6] == _losses(run_dir)[6]


def test_resume_config_values_are_checked():
    from dsv4.conf.schema import compose_config
    from dsv4.model.config import ConfigError

    with pytest.raises(ConfigError, match="run.keep_last"):
        compose_config("debug", ["run.keep_last=0"])
    with pytest.raises(ConfigError, match="run.save_interval"):
        compose_config("debug", ["run.save_interval=-1"])
    with pytest.raises(ConfigError, match="run.resume"):
        compose_config("debug", ["run.resume="])


def test_export_reads_a_sharded_checkpoint(cache_dir, groups, tmp_path):
    """dsv4-export --checkpoint: a tp2 checkpoint becomes a Hugging Face directory whose transformers logits equal
    dsv4's for the loaded weights (which are the trained ones, not a fresh init)."""
    import dsv4
    import transformers
    from dsv4.train.checkpoint import load_model_weights, model_config_of
    from dsv4.train.export import main

    run_dir = str(tmp_path / "run")
    run_workers(_train, 2, cache_dir, run_dir, ["parallel.tp=2", "data.micro_batch_size=4", "run.steps=3",
                                                "run.eval_interval=0"], timeout=600)
    assert main(["--out", str(tmp_path / "hf"), "--checkpoint", run_dir]) == 0
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000003")
    model = dsv4.build_model(model_config_of(ckpt), groups=groups)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    load_model_weights(ckpt, model, groups)
    assert not torch.equal(fresh["layers.0.attn.wq_a.weight"], model.state_dict()["layers.0.attn.wq_a.weight"])
    assert not model.cfg.quant_sim  # the debug preset computes as transformers does (no FP8/FP4 simulation)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ours = dsv4.logits(model, ids)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert main(["--out", str(tmp_path / "hf2"), "--checkpoint", str(tmp_path / "nowhere")]) == 2
