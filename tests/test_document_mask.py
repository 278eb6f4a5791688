"""Sample-level document masking (data.document_mask): nothing flows between documents packed into one sequence.

For every layer kind (sliding window, CSA with its indexer and overlapped compressor, HCA) and for the whole model:
changing one document never changes the outputs at another document's positions, exactly; and a document boundary
that falls inside a compression block keeps that block's entry out of the later document.
"""

import pytest
import torch

import dsv4
from dsv4.model.attention import Attention
from dsv4.model.compressor import Compressor, same_document_entries
from dsv4.model.rope import RotaryEmbedding
from dsv4.parallel.layers import make_layer_context
from dsv4.train.data import _collate

LAYER = {"swa": 0, "csa": 2, "hca": 3}  # debug schedule [0, 0, 4, 16, 4, 16, 0]
S = 128


def doc_ids(boundaries, s=S, b=2):
    """[s, b] document ids that start new documents at the given positions."""
    ids = torch.zeros(s, dtype=torch.long)
    for p in boundaries:
        ids[p:] += 1
    return ids.unsqueeze(1).expand(s, b).contiguous()


@pytest.fixture()
def cfg(debug_cfg):
    return debug_cfg.replace(quant_sim=False)


@pytest.mark.parametrize("kind", list(LAYER))
@pytest.mark.parametrize("boundary", [50, 64])  # inside a block of both ratios, and on a block edge
@pytest.mark.parametrize("phase", ["sparse", "dense"])
def test_attention_layers_keep_documents_apart(cfg, groups, kind, boundary, phase):
    torch.manual_seed(0)
    attn = Attention(cfg, make_layer_context(groups.tp, 0.02), LAYER[kind]).eval()
    attn.phase = phase
    rope = RotaryEmbedding(cfg)
    docs = doc_ids([boundary])
    x = torch.randn(S, 2, cfg.hidden_size)
    y = x.clone()
    y[:boundary] += torch.randn(boundary, 2, cfg.hidden_size)  # a different first document
    z = x.clone()
    z[boundary:] += torch.randn(S - boundary, 2, cfg.hidden_size)  # a different second document
    with torch.no_grad():
        out_x, out_y, out_z = (attn(v, rope, doc_ids=docs) for v in (x, y, z))
    assert torch.equal(out_x[boundary:], out_y[boundary:])
    assert torch.equal(out_x[:boundary], out_z[:boundary])
    assert not torch.equal(out_x[boundary:], out_z[boundary:])


@pytest.mark.parametrize("overlap", [False, True])
def test_compressed_entries_pool_one_document(cfg, groups, overlap):
    """An entry whose block ends in document 1 gets nothing from document 0's tokens (even through the overlap)."""
    torch.manual_seed(0)
    ratio = cfg.csa_ratio if overlap else cfg.hca_ratio
    comp = Compressor(cfg, make_layer_context(groups.tp, 0.02), ratio, cfg.head_dim, overlap=overlap)
    rope = RotaryEmbedding(cfg)
    boundary = 2 * ratio + 1  # inside block 2
    docs = doc_ids([boundary])
    x = torch.randn(S, 2, cfg.hidden_size)
    y = x.clone()
    y[:boundary] += 1.0
    a, b = comp(x, rope, docs), comp(y, rope, docs)
    assert torch.equal(a[2:], b[2:])  # blocks 2.. end in document 1
    assert not torch.equal(a[:2], b[:2])
    visible = same_document_entries(docs, S // ratio, ratio)  # [b, s, T]
    assert not visible[:, boundary:, :2].any() and visible[:, boundary:, 2:].all()


def test_whole_model_keeps_documents_apart(groups):
    model = dsv4.build_model("debug", ["quant_sim=false"], groups=groups)
    ids = torch.randint(0, 1024, (2, S), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[:, :70] = torch.randint(0, 1024, (2, 70), generator=torch.Generator().manual_seed(1))
    docs = doc_ids([70]).t()
    with torch.no_grad():
        a = model(ids, document_ids=docs).logits
        b = model(other, document_ids=docs).logits
        c = model(other).logits  # without the mask the second document does see the first
    assert torch.equal(a[:, 70:], b[:, 70:])
    assert not torch.equal(a[:, 70:], c[:, 70:])


def test_loader_marks_documents_by_end_of_document_tokens():
    """document_ids count the EOD tokens before each position: an EOD belongs to the document it ends."""
    eod = 0
    tokens = torch.tensor([5, 6, eod, 7, eod, eod, 8])
    sample = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(7)}
    batch = _collate([sample], eod)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 3]]
    assert "document_ids" not in _collate([sample])


def test_training_with_document_mask_runs(tmp_path, groups):
    from dsv4.conf.schema import compose_config
    from dsv4.train import loop

    cfg = compose_config("debug", [f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path / 'run'}",
                                   "data.document_mask=true", "run.steps=2", "optim.warmup_steps=1",
                                   "data.seq_length=128", "run.eval_interval=2", "run.eval_iters=1",
                                   "run.progress_bar=false"])
    result = loop.train(cfg)
    assert len(result.history) == 2 and result.valid_loss is not None
