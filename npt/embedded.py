"""The embedded default: a corpus and a small trained Llama teacher built offline.

Nothing can be downloaded from a model hub on many machines, yet a run with no arguments must
train something real. The corpus is the docstrings of the Python standard library (~1.5 MB of
English, present wherever Python is). The teacher is a small Llama with its own BPE tokenizer,
trained for a few minutes on that corpus. A *trained* teacher matters: on a randomly initialised
teacher attention carries no structure and NPT students learn almost nothing.

Both are built deterministically and cached under `$NPT_CACHE_DIR` (default `~/.cache/npt`),
keyed by a hash of the corpus and the recipe, so a different Python version builds its own.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

EMBEDDED_NAME = "npt-embedded-default"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__"}


def cache_root() -> Path:
    return Path(os.environ.get("NPT_CACHE_DIR") or Path.home() / ".cache" / "npt").expanduser()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise builders (several processes of one distributed run, or two runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- corpus -----------------------------------------------------------------------------------


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order.

    Sources are parsed, never imported, so nothing runs and the order depends only on the files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    docs: list[str] = []
    for path in sorted(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (e.g. bad-syntax test data)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def default_corpus(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The embedded corpus, cached as JSON lines (parsing the stdlib takes a few seconds)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"corpus-py{sys.version_info.major}{sys.version_info.minor}.jsonl"
    if not path.is_file():
        with _file_lock(root / ".corpus.lock"):
            if not path.is_file():
                docs = stdlib_docstrings()
                tmp = path.with_suffix(".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    for d in docs:
                        f.write(json.dumps({"text": d}) + "\n")
                os.replace(tmp, path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def corpus_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ---- teacher ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_position_embeddings: int = 512
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 800
    learning_rate: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_fraction: float = 0.02
    seed: int = 1234

    def fingerprint(self, corpus_hash: str) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + corpus_hash + "v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT_RECIPE = TeacherRecipe()
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with <s> prepended to every document, like Llama's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    from .data import Packer

    packer = Packer(tokenizer, seq_len, docs_per_call=512)
    blocks = list(packer.blocks(iter(docs)))
    return torch.stack(blocks)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        loss = model(input_ids=x, labels=x).loss
        n = x[:, 1:].numel()
        total += loss.item() * n
        count += n
    return math.exp(total / count)


def build_teacher(out_dir: Path, docs: list[str], recipe: TeacherRecipe = DEFAULT_RECIPE, progress: bool = True) -> dict:
    """Train the tokenizer and the teacher and save both to `out_dir` (written atomically)."""
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from .data import is_heldout

    start = time.time()
    train_docs = [d for d in docs if not is_heldout(d, recipe.eval_fraction)]
    heldout_docs = [d for d in docs if is_heldout(d, recipe.eval_fraction)]
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    train_blocks = _blocks(train_docs, tokenizer, recipe.seq_len)
    eval_blocks = _blocks(heldout_docs, tokenizer, recipe.seq_len)

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc="building the embedded teacher", disable=not progress, leave=False)
    for step in bar:
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        lr = recipe.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = train_blocks[torch.randint(len(train_blocks), (recipe.batch_size,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    ppl = perplexity(model, eval_blocks)
    info = {
        "heldout_perplexity": ppl,
        "train_tokens": int(train_blocks.numel()),
        "heldout_tokens": int(eval_blocks.numel()),
        "build_seconds": round(time.time() - start, 1),
        "recipe": dataclasses.asdict(recipe),
        "corpus_sha256": corpus_fingerprint(docs),
    }
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir)
    return info


def ensure_default_teacher(
    cache_dir: str | os.PathLike | None = None, recipe: TeacherRecipe = DEFAULT_RECIPE, progress: bool = True
) -> Path:
    """Path to the embedded teacher, building it first if it is not cached yet."""
    root = Path(cache_dir) if cache_dir else cache_root()
    docs = default_corpus(root)
    path = root / f"teacher-{recipe.fingerprint(corpus_fingerprint(docs))}"
    if (path / "build_info.json").is_file():
        return path
    with _file_lock(root / ".teacher.lock"):
        if not (path / "build_info.json").is_file():
            if progress:
                print(f"Building the embedded default teacher in {path} (once; a few minutes on CPU) ...", flush=True)
            info = build_teacher(path, docs, recipe, progress)
            if progress:
                print(
                    f"Embedded teacher built in {info['build_seconds']:.0f} s: held-out perplexity "
                    f"{info['heldout_perplexity']:.1f} on {info['heldout_tokens']} tokens.",
                    flush=True,
                )
    return path
