"""`lm-pretrain`: the tiny Llama every LLM method compresses, tunes, serves or aligns.

Not a paper: the baseline job of `methods/INDEX.md` that trains a small Hugging Face
`LlamaForCausalLM` (sizes in `models/llm/model.py`) on a text corpus with a BPE tokenizer trained on
the same corpus (`models/llm/pretraining.py` holds the loop), then saves a standard HF folder
(config, safetensors, tokenizer with a chat template) and registers it. It lives beside the LLM
families rather than inside one because compression, inference, training and alignment methods all
start from its output.
"""

from __future__ import annotations

from pydantic import Field

from models.context import RunContext, cpu_threads
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
)
def run(ctx: RunContext, params: LMPretrainParams) -> None:
    """Pre-train a tiny Llama with its own BPE tokenizer; register the HF folder with its val perplexity."""
    with cpu_threads(ctx.resources):
        result = pretrain(ctx, params, params.optimizer)
    if result is None:
        return
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
