"""Data: sources, held-out split, packing, errors, resumable stream state, sharding."""

from __future__ import annotations

import io
import json

import pytest
import torch

from npt.data import DataArguments, TrainStream, heldout_blocks, is_heldout, open_source
from npt.errors import NPTError
from npt.teachers import train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def make_docs(n: int = 300, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        k = int(torch.randint(5, 40, (1,), generator=g))
        docs.append(f"doc {i}: " + " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)))
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_tokenizer(docs, 300)


@pytest.fixture
def jsonl(tmp_path, docs):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def spec_for(path, **kw) -> DataArguments:
    return DataArguments(data_files=[str(path)], text_column="content", max_length=16, eval_fraction=0.1, eval_blocks=10, shuffle_buffer=8, **kw)


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # the state must load without unpickling objects


def test_heldout_split_is_deterministic_and_by_content():
    assert is_heldout("same text", 0.5) == is_heldout("same text", 0.5)
    share = sum(is_heldout(d, 0.1) for d in make_docs(2000)) / 2000
    assert 0.07 < share < 0.13


@pytest.mark.parametrize("streaming", [False, True])
def test_heldout_blocks_and_training_stream_share_no_block(jsonl, tokenizer, streaming):
    spec = spec_for(jsonl, streaming=streaming)
    held = heldout_blocks(open_source(spec), tokenizer, spec)
    assert held.shape == (10, 16)
    stream = TrainStream(open_source(spec), tokenizer, spec, batch_size=4)
    train_blocks: set[tuple] = set()
    while stream.source.epoch < 2:  # two full passes over the training documents
        train_blocks.update(tuple(b.tolist()) for b in stream.next_batch())
    assert not train_blocks & {tuple(b.tolist()) for b in held}
    # and no held-out document's text reaches the training stream
    eval_ids = {tokenizer.decode(b) for b in held}
    assert not any(tokenizer.decode(list(b)) in eval_ids for b in train_blocks)


def test_packing_puts_eos_between_documents(tokenizer):
    from npt.data import Packer

    packer = Packer(tokenizer, 8)
    blocks = packer.add(["alpha beta", "gamma delta epsilon"])
    flat = torch.cat(blocks).tolist() + packer.carry
    a = tokenizer("alpha beta")["input_ids"] + [tokenizer.eos_token_id]
    b = tokenizer("gamma delta epsilon")["input_ids"] + [tokenizer.eos_token_id]
    assert flat == a + b
    assert a[0] == tokenizer.bos_token_id
    assert all(len(x) == 8 for x in blocks)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "csv", "folder"])
def test_local_file_formats(tmp_path, docs, tokenizer, fmt):
    import datasets

    rows = [{"text": d} for d in docs]
    if fmt == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(docs) + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt in ("parquet", "csv"):
        path = tmp_path / f"d.{fmt}"
        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.to_csv(str(path))
    else:
        path = tmp_path / "folder"
        (path / "sub").mkdir(parents=True)
        (path / "a.txt").write_text("\n".join(docs[:150]))
        (path / "sub" / "b.txt").write_text("\n".join(docs[150:]))
    spec = DataArguments(data_files=[str(path)], max_length=16, eval_fraction=0.1, eval_blocks=4)
    source = open_source(spec)
    assert len(source) == len(docs)
    stream = TrainStream(source, tokenizer, spec, batch_size=2)
    assert stream.next_batch().shape == (2, 16)


def test_bad_data_inputs_name_cause_and_fix(tmp_path, jsonl, tokenizer):
    with pytest.raises(NPTError, match="does not exist"):
        open_source(DataArguments(data_files=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(NPTError, match=r"no column 'text'; its columns are \['content', 'id'\]"):
        open_source(DataArguments(data_files=[str(jsonl)], text_column="text"))
    with pytest.raises(NPTError, match=r"no column 'body'"):
        open_source(DataArguments(data_files=[str(jsonl)], text_column="body", streaming=True))
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(NPTError, match="Unsupported data file"):
        open_source(DataArguments(data_files=[str(tmp_path / "x.bin")]))
    with pytest.raises(NPTError, match="Cannot load dataset 'no-such-org/no-such-dataset'"):
        open_source(DataArguments(dataset_name="no-such-org/no-such-dataset"))
    small = tmp_path / "small.txt"
    text = next(t for t in (f"a few words {i}" for i in range(100)) if not is_heldout(t, 0.01))
    small.write_text(text + "\n")
    spec = DataArguments(data_files=[str(small)], max_length=64, eval_fraction=0.01, shuffle_buffer=4)
    with pytest.raises(NPTError, match="fewer than one block"):
        TrainStream(open_source(spec), tokenizer, spec, 2).next_batch()


@pytest.mark.parametrize("streaming", [False, True])
def test_stream_state_resumes_exactly(jsonl, tokenizer, streaming):
    spec = spec_for(jsonl, streaming=streaming)
    a = TrainStream(open_source(spec), tokenizer, spec, batch_size=3)
    for _ in range(37):  # into the second epoch
        a.next_batch()
    state = _round_trip(a.state_dict())
    expected = [a.next_batch() for _ in range(60)]
    b = TrainStream(open_source(spec), tokenizer, spec, batch_size=3)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(b.next_batch(), want)


def test_two_processes_take_disjoint_slices_of_the_single_process_batch(jsonl, tokenizer):
    spec = spec_for(jsonl)
    single = TrainStream(open_source(spec), tokenizer, spec, batch_size=6)
    ranks = [TrainStream(open_source(spec), tokenizer, spec, batch_size=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), single.next_batch())
    assert ranks[0].state_dict()["source"] == ranks[1].state_dict()["source"]  # one data position for all
