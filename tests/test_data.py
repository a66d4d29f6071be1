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


@pytest.fixture(scope="module")
def plain_tokenizer(docs):
    """A tokenizer that adds no BOS (like SmolLM2's)."""
    return train_tokenizer(docs, 300, add_bos=False)


class WordTokenizer:
    """Words to ids by a fixed table, BOS 1 in front of every text, EOS 2: block layouts by hand."""

    bos_token, eos_token, bos_token_id, eos_token_id = "<s>", "</s>", 1, 2

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def __call__(self, texts, add_special_tokens: bool = True):
        one = isinstance(texts, str)
        ids = [[1] * (self.add_bos and add_special_tokens) + [int(w) if w.isdigit() else 99 for w in t.split()] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}


def test_the_tokenizer_says_whether_it_adds_bos(tokenizer, plain_tokenizer):
    from npt.data import adds_bos, block_convention

    assert adds_bos(tokenizer) and not adds_bos(plain_tokenizer)
    assert adds_bos(WordTokenizer()) and not adds_bos(WordTokenizer(add_bos=False))
    assert "starts with BOS '<s>'" in block_convention(tokenizer)
    assert "adds no BOS" in block_convention(plain_tokenizer)


def test_every_block_starts_with_bos_when_the_tokenizer_adds_it():
    from npt.data import Packer

    # stream: <s> 10 11 12 13 14 </s> <s> 20 .. 28 </s>, blocks of 4
    packer = Packer(WordTokenizer(), 4)
    blocks = [b.tolist() for b in packer.add(["10 11 12 13 14", " ".join(str(i) for i in range(20, 29))])]
    assert blocks == [
        [1, 10, 11, 12],  # a document starts here: its own BOS, no second one
        [1, 13, 14, 2],  # cut mid-document: BOS + 3 tokens of the stream
        [1, 20, 21, 22],
        [1, 23, 24, 25],
        [1, 26, 27, 28],
    ]
    assert packer.carry == [2]  # left for the next call, then [BOS, 2, ...]
    assert [b.tolist() for b in packer.add(["30 31"])] == [[1, 2, 1, 30]]
    assert packer.carry == [31, 2]


def test_blocks_fall_as_they_are_cut_when_the_tokenizer_adds_no_bos(plain_tokenizer):
    from npt.data import Packer

    packer = Packer(WordTokenizer(add_bos=False), 4)
    blocks = [b.tolist() for b in packer.add(["10 11 12 13 14", "20 21 22"])]
    assert blocks == [[10, 11, 12, 13], [14, 2, 20, 21]] and packer.carry == [22, 2]
    # a trained tokenizer without BOS: the blocks are the joined stream, EOS between documents
    packer = Packer(plain_tokenizer, 8)
    blocks = packer.add(["alpha beta", "gamma delta epsilon"])
    flat = torch.cat(blocks).tolist() + packer.carry
    a = plain_tokenizer("alpha beta")["input_ids"] + [plain_tokenizer.eos_token_id]
    b = plain_tokenizer("gamma delta epsilon")["input_ids"] + [plain_tokenizer.eos_token_id]
    assert flat == a + b and plain_tokenizer.bos_token_id not in flat
    assert all(len(x) == 8 for x in blocks)


@pytest.mark.parametrize("streaming", [False, True])
def test_training_and_heldout_blocks_follow_the_convention(jsonl, tokenizer, plain_tokenizer, streaming):
    spec = spec_for(jsonl, streaming=streaming)
    bos = tokenizer.bos_token_id
    stream = TrainStream(open_source(spec), tokenizer, spec, batch_size=8)
    for blocks in [heldout_blocks(open_source(spec), tokenizer, spec), *(stream.next_batch() for _ in range(20))]:
        assert (blocks[:, 0] == bos).all() and not (blocks[:, 1] == bos).any()
    # a tokenizer without BOS: no block gets one
    plain = TrainStream(open_source(spec), plain_tokenizer, spec, batch_size=8)
    assert not (plain.next_batch() == plain_tokenizer.bos_token_id).any()
    assert not (heldout_blocks(open_source(spec), plain_tokenizer, spec) == plain_tokenizer.bos_token_id).any()


def test_resume_refuses_a_stream_packed_with_another_convention(jsonl, tokenizer, plain_tokenizer):
    spec = spec_for(jsonl)
    state = _round_trip(TrainStream(open_source(spec), tokenizer, spec, batch_size=2).state_dict())
    assert state["bos_blocks"] is True
    with pytest.raises(NPTError, match="packed with a BOS token at every block start, this tokenizer adds no BOS"):
        TrainStream(open_source(spec), plain_tokenizer, spec, batch_size=2).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "bos_blocks"}  # a state from before the convention
    with pytest.raises(NPTError, match="packed without a BOS"):
        TrainStream(open_source(spec), tokenizer, spec, batch_size=2).load_state_dict(old)
    TrainStream(open_source(spec), plain_tokenizer, spec, batch_size=2).load_state_dict(old | {"buffer": old["buffer"]})


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
@pytest.mark.parametrize("bos", [True, False])
def test_stream_state_resumes_exactly(jsonl, tokenizer, plain_tokenizer, streaming, bos):
    spec = spec_for(jsonl, streaming=streaming)
    tokenizer = tokenizer if bos else plain_tokenizer
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
