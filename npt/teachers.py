"""Small trained teachers built offline: the embedded default and the teacher zoo.

Nothing can be downloaded from a model hub on many machines, yet a run with no arguments must
train something real, and a recipe must be checked on more than one model. A teacher here is a
small Llama-family model with its own BPE tokenizer, trained for a few minutes on a built-in
corpus (corpus.py). A *trained* teacher matters: on a randomly initialised teacher attention
carries no structure and NPT students learn almost nothing.

    npt-embedded-default   Llama, hidden 128, 4 layers, vocab 2048, docstrings (the default teacher)
    zoo:<name>             the teachers of ZOO below, which differ in what matters for NPT:
                           architecture, GQA ratio, depth, width, vocabulary and corpus

Each is built deterministically on first use and cached under `$NPT_CACHE_DIR` (default
`~/.cache/npt`), keyed by a hash of its corpus and recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config, PreTrainedTokenizerFast,
                          Qwen2Config)

from .corpus import cache_root, file_lock, fingerprint, load_corpus
from .data import Packer, is_heldout
from .errors import NPTError
from .gguf import PACKAGED

logger = logging.getLogger(__name__)
EMBEDDED_NAME = "npt-embedded-default"
ZOO_PREFIX = "zoo:"


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
    architecture: str = "llama"  # llama, mistral, qwen2 (q/k/v biases), gemma3 (sandwich norms), olmo2 (post-norms)
    num_kv_heads: int | None = None  # grouped-query attention; None: one per head
    corpus: str = "docstrings"
    tie_embeddings: bool = True
    sliding_window: int | None = None  # gemma3: every layer but each sixth attends this far back only

    def fingerprint(self, corpus_hash: str) -> str:
        fields = dataclasses.asdict(self)
        # fields added after the first release enter the key only when they differ from their
        # defaults, so a cached embedded teacher stays valid
        for f in ("architecture", "num_kv_heads", "corpus", "tie_embeddings", "sliding_window"):
            if fields[f] == TeacherRecipe.__dataclass_fields__[f].default:
                del fields[f]
        # v2: trained on blocks that each start with BOS (data.Packer), as the suite feeds them
        blob = json.dumps(fields, sort_keys=True) + corpus_hash + "v2"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def model_config(self, tokenizer):
        classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig, "olmo2": Olmo2Config}
        if self.architecture not in classes:
            raise NPTError(f"Teacher architecture {self.architecture!r} is not one of {sorted(classes)}.", "Fix the recipe.")
        extra = {"sliding_window": None} if self.architecture in ("mistral", "qwen2") else {}
        if self.architecture == "gemma3":
            head_dim = self.hidden_size // self.num_heads
            extra = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": self.sliding_window or self.seq_len,
                     "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_layers)]}
        return classes[self.architecture](
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )


DEFAULT_RECIPE = TeacherRecipe()

# The zoo: teachers that differ from the embedded default in what matters for NPT. Each builds in
# a few minutes on 2 CPU cores (the wider ones on fewer tokens).
ZOO: dict[str, TeacherRecipe] = {
    # wide and shallow, untied head, code
    "llama-wide-code": TeacherRecipe(architecture="llama", hidden_size=384, intermediate_size=1024, num_layers=2, num_heads=6,
                                     vocab_size=4096, tie_embeddings=False, corpus="code", batch_size=16, steps=700, learning_rate=3e-3),
    # narrow and deep, multi-query attention (4 heads share 1 key/value head)
    "mistral-deep": TeacherRecipe(architecture="mistral", hidden_size=64, intermediate_size=192, num_layers=12, num_heads=4,
                                  num_kv_heads=1, vocab_size=1024, corpus="docstrings", steps=900),
    # q/k/v biases, GQA 5:1, another domain of English (the language reference) next to docstrings
    "qwen2-gqa": TeacherRecipe(architecture="qwen2", hidden_size=160, intermediate_size=448, num_layers=6, num_heads=10,
                               num_kv_heads=2, vocab_size=3072, corpus="mixed", batch_size=16, steps=700),
    # GQA 3:1, a large vocabulary for its width, code
    "llama-gqa-code": TeacherRecipe(architecture="llama", hidden_size=192, intermediate_size=512, num_layers=6, num_heads=6,
                                    num_kv_heads=2, vocab_size=8192, corpus="code", batch_size=16, steps=700, learning_rate=4e-3),
    # Gemma-3-style: sandwich norms ((1 + w) RMSNorm before and after attention and MLP), GeLU-tanh
    # gate, scaled embeddings, q/k norms, five sliding-window layers (32 tokens back) per full one
    "gemma3-sandwich": TeacherRecipe(architecture="gemma3", hidden_size=128, intermediate_size=384, num_layers=6, num_heads=4,
                                     num_kv_heads=2, vocab_size=2048, sliding_window=32, corpus="mixed", steps=800),
    # OLMo-2-style: norms after attention and after the MLP only (the MLP reads the raw residual),
    # q/k norms, untied head, code
    "olmo2-postnorm": TeacherRecipe(architecture="olmo2", hidden_size=128, intermediate_size=384, num_layers=5, num_heads=4,
                                    vocab_size=3072, tie_embeddings=False, corpus="code", steps=800),
}


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(docs: list[str], vocab_size: int, add_bos: bool = True):
    """Byte-level BPE with <s> prepended to every document, like Llama's tokenizers (`add_bos`
    False: none, like SmolLM2's)."""
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
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _blocks(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    packer = Packer(tokenizer, seq_len, docs_per_call=512)
    blocks = list(packer.blocks(iter(docs)))
    return torch.stack(blocks)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """exp of the mean next-token loss over full blocks: a built teacher's quality, and the damage
    an injection does (npt-inject)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        loss = model(input_ids=x, labels=x).loss
        n = x[:, 1:].numel()
        total += loss.item() * n
        count += n
    return math.exp(total / count)


def build_teacher(out_dir: Path, docs: list[str], recipe: TeacherRecipe = DEFAULT_RECIPE, progress: bool = True,
                  name: str = EMBEDDED_NAME) -> dict:
    """Train the tokenizer and the teacher and save both to `out_dir` (written atomically)."""
    start = time.time()
    train_docs = [d for d in docs if not is_heldout(d, recipe.eval_fraction)]
    heldout_docs = [d for d in docs if is_heldout(d, recipe.eval_fraction)]
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    train_blocks = _blocks(train_docs, tokenizer, recipe.seq_len)
    eval_blocks = _blocks(heldout_docs, tokenizer, recipe.seq_len)

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(recipe.model_config(tokenizer))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"building the teacher {name}", disable=not progress, leave=False)
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
        "corpus_sha256": fingerprint(docs),
    }
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir)
    return info


def ensure_teacher(recipe: TeacherRecipe = DEFAULT_RECIPE, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                   name: str = EMBEDDED_NAME) -> Path:
    """Path to the teacher of `recipe`, building it first if it is not cached yet."""
    root = Path(cache_dir) if cache_dir else cache_root()
    docs = load_corpus(recipe.corpus, root)
    path = root / f"teacher-{recipe.fingerprint(fingerprint(docs))}"
    if (path / "build_info.json").is_file():
        return path
    with file_lock(path.with_name(path.name + ".lock")):  # per teacher: different teachers build in parallel processes
        if not (path / "build_info.json").is_file():
            if progress:
                logger.info(f"Building the teacher {name} in {path} (once; a few minutes on CPU) ...")
            info = build_teacher(path, docs, recipe, progress, name)
            if progress:
                logger.info(f"Teacher {name} built in {info['build_seconds']:.0f} s: held-out perplexity "
                            f"{info['heldout_perplexity']:.1f} on {info['heldout_tokens']} tokens.")
    return path


def zoo_recipe(name: str) -> TeacherRecipe:
    """The recipe of `zoo:<name>` (or of the embedded default)."""
    if name == EMBEDDED_NAME:
        return DEFAULT_RECIPE
    key = name.removeprefix(ZOO_PREFIX)
    if key not in ZOO:
        raise NPTError(f"{name!r} is not a teacher of the zoo.", f"Use one of: {', '.join(ZOO_PREFIX + k for k in [*ZOO, *PACKAGED])}.")
    return ZOO[key]


def ensure_named_teacher(name: str, progress: bool = True) -> Path:
    """`npt-embedded-default` or `zoo:<name>`: the cached folder, built on first use."""
    return ensure_teacher(zoo_recipe(name), progress=progress, name=name)
