"""`lm-pretrain`: the tiny Llama every LLM method compresses, tunes, serves or aligns.

Not a paper: a baseline job that trains a small Hugging Face `LlamaForCausalLM` (the LLaMA architecture of
Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", arXiv:2302.13971: pre-norm RMSNorm,
SwiGLU MLP, rotary positions; sizes in `models/llm/model.py`) on a text corpus, with a byte-level BPE
tokenizer trained on the same corpus's train split. The loop (`models/llm/pretraining.py`) is the usual
GPT/Llama recipe at small scale: random windows of `seq_len` tokens from the packed train stream, next-token
cross-entropy, AdamW (β = 0.9/0.95, decoupled weight decay on matrices only, as nanoGPT groups it), global
gradient-norm clipping, and a learning rate that warms up linearly for `warmup_steps` and then decays by a
cosine to a tenth of the peak:

    lr(t) = lr · (t + 1)/T_w                                   for t < T_w
    lr(t) = lr · (0.1 + 0.9 · ½(1 + cos(π (t − T_w)/(T − T_w))))   after

Held-out loss and perplexity exp(mean NLL) on fixed val windows are logged every `eval_every` steps. The
finished model is saved as a standard HF folder (config, safetensors, the tokenizer with a chat template)
and registered with its lineage. `optimizer` swaps AdamW for any optimizer of the `models.optim` registry
(FRUGAL, Stable-SPAM, GaLore, BAdam, ...) at the same learning rate and weight decay, so the LLM-training
methods can pre-train with their optimizers.

Defaults (`size` tiny ≈1.3M parameters, 400 steps of 8×256 tokens at lr 3e-3) are the recipe of the cached
base model (`models/llm/base.py`) that the compression, inference, training and alignment methods start
from: a few CPU minutes, chosen for this service's CPU budget rather than taken from a paper. Resumable:
a checkpoint holds the weights, optimizer moments, batch generator, step and the tokenizer itself, so a
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from pydantic import Field

from models.context import RunContext
from models.llm.folder import save_folder
from models.llm.model import parameter_count
from models.llm.pretraining import PretrainParams, pretrain
from models.optim import OptimizerName
from models.plots import curves_figure
from models.registry import method


class LMPretrainParams(PretrainParams):
    optimizer: OptimizerName = Field(
        "adamw",
        description="optimizer (models/optim): AdamW with nanoGPT's decay "
        "groups, or e.g. frugal, stable-spam, galore-adamw, badam "
        "with their defaults at this lr",
    )


@method(
    "lm-pretrain",
    family="llm",
    task="train",
    datasets=("text-corpus",),
    params=LMPretrainParams,
    paper="Baseline job: causal-LM pre-training of a tiny Llama (Touvron et al., LLaMA, 2023 architecture)",
    tiny={
        "size": "micro",
        "vocab_size": 300,
        "steps": 3,
        "batch_size": 2,
        "seq_len": 16,
        "warmup_steps": 1,
        "eval_every": 2,
        "eval_windows": 2,
        "checkpoint_every": 0,
        "max_documents": 4,
        "model_name": "tiny-llama",
    },
)
def run(ctx: RunContext, params: LMPretrainParams) -> None:
    """Pre-train a tiny Llama with its own BPE tokenizer; register the HF folder with its val perplexity."""
    result = pretrain(ctx, params, params.optimizer)
    lineage = {
        "method": "lm-pretrain",
        "job_id": ctx.job_id,
        "parent": None,
        "dataset": ctx.dataset.name if ctx.dataset else None,
        "seed": ctx.seed,
        "params": params.model_dump(),
        "parameters": parameter_count(result.model),
        "val_loss": result.val_loss,
        "val_ppl": result.val_ppl,
    }
    folder = save_folder(result.model, result.tokenizer, ctx.workdir / params.model_name, lineage)
    ref = ctx.register_model(params.model_name, folder, lineage)
    ctx.log(params.steps, final_val_ppl=result.val_ppl, optimizer_state_bytes=result.optimizer_bytes)
    ctx.progress(params.steps, params.steps, f"registered {ref}: val ppl {result.val_ppl:.2f}")
    steps = [row["step"] for row in result.history]
    panels = {"val loss (nats/token)": {params.size: (steps, [row["val_loss"] for row in result.history])}}
    ctx.save_artifact("loss.png", curves_figure(panels, "step", title=f"lm-pretrain {params.size}"), kind="plot")
