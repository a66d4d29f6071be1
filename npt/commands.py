"""What a trained adapter is for: evaluate it on any text, compare its continuations with the
teacher's, inject a context into a plain model. Each command is an argument dataclass and a
function; `cli.py` parses and reports.

    npt-eval ADAPTER [--data_files ... | --dataset_name ...]
    npt-generate ADAPTER --prompt "..." [--do_sample]
    npt-inject ADAPTER --context "..." --output_dir OUT [--alpha 1.0 --layers all --positions last]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer
from transformers.hf_argparser import HfArg

from .architecture import decoder_layers, layer_wiring, resolve_layers
from .data import DataArguments, block_convention, heldout_blocks, open_source, with_default_dataset
from .errors import NPTError
from .evaluate import attribution_table, evaluate, layer_attribution, measure_greedy
from .inject import add_to_weights, context_deltas, continuation_loss, parse_positions
from .loading import ModelArguments, dtype_name, resolve_model_path
from .model import NPTModel
from .provenance import provenance
from .run import resolve_device
from .serialization import read_adapter_config, resolve_adapter_dir
from .teachers import perplexity


@dataclasses.dataclass
class LoadArguments:
    device: Literal["auto", "cpu", "cuda"] = HfArg(default="auto", help="auto (CUDA when present), cpu or cuda.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = HfArg(default=None, help="Dtype of the base weights (default: the one trained with).")

    @property
    def torch_device(self) -> str:
        return resolve_device(self.device)


def load(adapter: str, args: LoadArguments) -> tuple[NPTModel, object, Path]:
    """The NPT model, its tokenizer (saved with the adapters, else the base model's) and the adapter folder."""
    folder = resolve_adapter_dir(adapter)
    npt = NPTModel.from_pretrained(folder, dtype=args.dtype, device=args.torch_device)
    source = folder if (folder / "tokenizer_config.json").is_file() else resolve_model_path(npt.npt_config.base_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    npt.eval()
    return npt, tokenizer, folder


def run_data_defaults(adapter: str) -> dict:
    """The data settings of the run that wrote the adapters (its config.json next to adapter/),
    with its default corpus made explicit; the base model's corpus when there is no run."""
    folder = resolve_adapter_dir(adapter)
    base = read_adapter_config(folder).base_model_name_or_path
    saved = folder.parent / "config.json"
    fields = {f.name for f in dataclasses.fields(DataArguments)}
    values = {k: v for k, v in json.loads(saved.read_text()).items() if k in fields} if saved.is_file() else {}
    default = ModelArguments(model_name=base if base.startswith("zoo:") else None).default_dataset
    values["dataset_name"] = with_default_dataset(DataArguments(**values), default).dataset_name
    return values


# ---- npt-eval ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalArguments:
    eval_batch_size: int = HfArg(default=8, aliases=["--per_device_eval_batch_size"], help="Blocks per evaluation batch.")
    documents: Literal["auto", "heldout", "all"] = HfArg(
        default="auto", help="Which documents give the blocks: the held-out split, or all of them (auto: held-out for the run's own data, all for other text).")
    output_json: str | None = HfArg(default=None, help="Where the numbers go (default: <adapter>/eval.json).")
    greedy_prompts: int = HfArg(default=16, help="Prompts (the first 32 tokens of blocks) whose greedy continuations are compared; 0: none.")
    greedy_tokens: int = HfArg(default=32, help="Tokens generated per prompt for the greedy match.")
    layer_attribution: bool = HfArg(default=False, help="Also the KL and perplexity ratio with each converted layer reverted to its teacher layer, and with it alone converted (2 evaluations per layer).")


def run_eval(adapter: str, args: EvalArguments, data: DataArguments, own_data: bool, load_args: LoadArguments) -> dict:
    """The held-out evaluation of the end of training, on `data`."""
    npt, tokenizer, folder = load(adapter, load_args)
    every = args.documents == "all" or (args.documents == "auto" and not own_data)
    blocks = heldout_blocks(open_source(data), tokenizer, data, every_document=every)
    on_device = blocks.to(npt.device)
    result = evaluate(npt, on_device, args.eval_batch_size)
    samples = []
    if args.greedy_prompts:
        result, samples = measure_greedy(result, npt, tokenizer, blocks, args.greedy_prompts, args.greedy_tokens)
    report = {"adapter": str(folder), "data": data.dataset_name or data.data_files, "documents": "all" if every else "held-out",
              "blocks": len(blocks), "max_length": data.max_length, "block_layout": block_convention(tokenizer)} | result.record() | {"greedy_samples": samples}
    report["provenance"] = provenance(str(npt.device), f"{dtype_name(next(npt.model.parameters()).dtype)} weights")
    if args.layer_attribution:
        report["layer_attribution"] = layer_attribution(npt, on_device, args.eval_batch_size)
    out = Path(args.output_json) if args.output_json else folder / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(blocks)} blocks of {data.max_length} tokens; {block_convention(tokenizer)}")
    print(result.table())
    if args.layer_attribution:
        print("\nLayer attribution\n\n" + attribution_table(report["layer_attribution"], result.kl, result.ppl_ratio))
    print(f"\nWritten: {out}")
    return report


# ---- npt-generate -----------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateArguments:
    prompt: list[str] = HfArg(default_factory=list, help="One or more prompts (required).")
    max_new_tokens: int = HfArg(default=40, help="Tokens to generate.")
    do_sample: bool = HfArg(default=False, help="Sample instead of greedy decoding.")
    temperature: float = HfArg(default=1.0, help="Sampling temperature (with --do_sample).")
    top_p: float = HfArg(default=1.0, help="Nucleus sampling threshold (with --do_sample).")
    seed: int = HfArg(default=0, help="Seed of the sampling (the same for teacher and student).")
    width: int = HfArg(default=100, help="Characters per line of the side-by-side view.")


@torch.no_grad()
def run_generate(adapter: str, args: GenerateArguments, load_args: LoadArguments) -> list[dict]:
    """Teacher and student continuations of each prompt, side by side."""
    if not args.prompt:
        raise NPTError("No --prompt given.", 'Pass --prompt "Your text" (several may follow one --prompt).')
    npt, tokenizer, _ = load(adapter, load_args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=tokenizer.pad_token_id)
    if args.do_sample:
        kwargs |= dict(temperature=args.temperature, top_p=args.top_p)
    results = []
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(npt.device)
        outs = {}
        for who in ("teacher", "student"):
            torch.manual_seed(args.seed)
            if who == "teacher":
                with npt.teacher_mode():
                    tokens = npt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            else:
                tokens = npt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            outs[who] = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
        results.append({"prompt": prompt} | outs)
        print(side_by_side(prompt, outs["teacher"], outs["student"], args.width))
    return results


def side_by_side(prompt: str, teacher: str, student: str, width: int) -> str:
    half = max(20, (width - 3) // 2)
    left, right = textwrap.wrap(teacher, half) or [""], textwrap.wrap(student, half) or [""]
    rows = [f"{'teacher':<{half}} | student", f"{'-' * half}-+-{'-' * half}"]
    rows += [f"{a:<{half}} | {b}" for a, b in zip(left + [""] * (len(right) - len(left)), right + [""] * (len(left) - len(right)))]
    return "\n".join([f"prompt: {prompt}", *rows, ""])


# ---- npt-inject -------------------------------------------------------------------------------------


@dataclasses.dataclass
class InjectArguments:
    context: str | None = HfArg(default=None, help="The text whose weight change is injected (required).")
    output_dir: str | None = HfArg(default=None, help="Where the plain model folder is written (required).")
    alpha: float = HfArg(default=1.0, help="Strength: each modulated matrix W += alpha * dW.")
    layers: str = HfArg(default="all", help="NPT layers to inject into: all, or indices such as '2,3'.")
    positions: str = HfArg(default="last", help="Context positions whose deltas are averaged: last, all, or indices such as '0,5,-1'.")
    prompt: str | None = HfArg(default=None, help="Prompt for the effect measurement (default: the context's first half).")
    continuation: str | None = HfArg(default=None, help="Continuation whose loss is measured (default: the context's second half).")
    heldout_blocks: int = HfArg(default=16, help="Held-out blocks for the damage measurement (the run's own held-out data).")
    overwrite_output_dir: bool = HfArg(default=False, help="Allow replacing an existing output folder.")


@torch.no_grad()
def run_inject(adapter: str, args: InjectArguments, data: DataArguments, load_args: LoadArguments) -> dict:
    if not args.context or not args.output_dir:
        raise NPTError("npt-inject needs --context and --output_dir.", 'Pass e.g. --context "Paris is the capital of France." --output_dir injected/.')
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise NPTError(f"Output folder {out} is not empty.", "Pass another --output_dir, or --overwrite_output_dir.")
    npt, tokenizer, _ = load(adapter, load_args)
    device = npt.device
    context = tokenizer(args.context, return_tensors="pt").input_ids.to(device)
    if context.shape[1] < 2:
        raise NPTError("The context is shorter than two tokens.", "Pass a longer --context.")
    if args.prompt is not None or args.continuation is not None:
        if not (args.prompt and args.continuation):
            raise NPTError("--prompt and --continuation go together.", "Pass both, or neither (the context's two halves are used).")
        prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
        continuation = tokenizer(args.continuation, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    else:
        half = context.shape[1] // 2
        prompt, continuation = context[:, :half], context[:, half:]
    layers = npt.npt_config.layers if args.layers == "all" else resolve_layers(args.layers, npt.npt_config.num_hidden_layers)
    missing = [i for i in layers if i not in npt.npt_config.layers]
    if missing:
        raise NPTError(f"--layers {args.layers}: layers {missing} are not NPT layers of this adapter ({npt.npt_config.layers}).",
                       "Choose among the converted layers, or pass --layers all.")
    positions = parse_positions(args.positions, context.shape[1])
    data = dataclasses.replace(data, eval_blocks=args.heldout_blocks)
    blocks = heldout_blocks(open_source(data), tokenizer, data).to(device)

    deltas = context_deltas(npt, context, layers, positions)
    model = npt.unload()  # the teacher: the plain base model
    before = {"continuation_loss": continuation_loss(model, prompt, continuation), "heldout_ppl": perplexity(model, blocks, batch_size=8)}
    add_to_weights(model, deltas, args.alpha)
    after = {"continuation_loss": continuation_loss(model, prompt, continuation), "heldout_ppl": perplexity(model, blocks, batch_size=8)}
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    plain = decoder_layers(model)
    report = {
        "adapter": adapter, "output_dir": str(out), "context_tokens": context.shape[1], "layers": layers, "positions": positions,
        "alpha": args.alpha, "delta_frobenius": {str(i): {name: d.norm().item() for name, d in m.items()} for i, m in deltas.items()},
        "weight_frobenius": {str(i): {name: layer_wiring(plain[i], i).projection(plain[i], name)[0].float().norm().item() for name in m}
                             for i, m in deltas.items()},
        "before": before, "after": after,
    }
    (out / "injection.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"Injected the context ({context.shape[1]} tokens, positions {positions}) into {'+'.join(npt.npt_config.modulate)} of layers {layers}, alpha {args.alpha}:")
    print(f"  continuation loss   {before['continuation_loss']:.4f} -> {after['continuation_loss']:.4f} nats/token")
    print(f"  held-out perplexity {before['heldout_ppl']:.3f} -> {after['heldout_ppl']:.3f} ({len(blocks)} blocks)")
    print(f"Plain model folder: {out} (AutoModelForCausalLM.from_pretrained loads it without this package)")
    return report
