"""`train.init_from`: start a run from the model weights of a run, a checkpoint or an HF export.

Data flow position: model built (ZeRO-3 partitioned) -> **init_from** -> deepspeed.initialize
-> step 0. Only the weights come over: the optimizer, LR schedule, step and data position are
fresh. PATH may be a tfx run folder (its latest complete checkpoint), one checkpoint folder, or
a Hugging Face folder written by `tfx convert` (its names mapped back by
`tfx.model.export_names`). Rank 0 reads the weights (DeepSpeed's consolidation, or the
safetensors files) and `engine.load_partitioned` writes them into the partitions one parameter
at a time. A part the weights lack (say, a new projector over a pretrained LLM) keeps its fresh
initialisation and is named in the log; a shape mismatch is a one-line error before training.
Stage k of a recipe is initialised this way from stage k-1's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from tfx.errors import ConfigError
from tfx.model import export_names
from tfx.train import checkpoint
from tfx.train.dist import rank


def is_hf_export(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "tokenflex"


def read_weights(path: str | Path) -> dict:
    """Every tensor of PATH under the training model's names (call on one rank only)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"train.init_from: {path} does not exist")
    if is_hf_export(path):
        from safetensors.torch import load_file

        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise ConfigError(f"train.init_from: {path} holds no model*.safetensors")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return {export_names.from_hf(k): v for k, v in state.items()}
    root, tag = checkpoint.resolve(path)
    return checkpoint.load_consolidated(root, tag)


def init_weights(model, path: str, log) -> dict:
    """Collective: load PATH into `model` (before deepspeed.initialize, so the optimizer's fp32
    copies start from these weights). Returns the load report."""
    from tfx.train.engine import load_partitioned

    state = read_weights(path) if rank() == 0 else None
    report = load_partitioned(model, state, strict=False, where=f"train.init_from {path}")
    if rank() == 0:
        fresh = sorted({n.split(".")[0] + "." + n.split(".")[1] if n.count(".") else n
                        for n in report["missing"]})
        log.info(f"init_from {path}: {len(report['loaded'])} tensors loaded"
                 + (f"; kept their fresh initialisation: {', '.join(fresh)} "
                    f"({len(report['missing'])} tensors)" if report["missing"] else "")
                 + (f"; not in this model, ignored: {report['unexpected'][:5]}"
                    if report["unexpected"] else ""))
    return report
