"""Recipes: the stages of one config (align -> enhance -> instruct) run in order.

Data flow position: config (`load_recipe`) -> **stages** -> one `train()` per stage. Stage k
trains into `output_dir/<name>/`, initialised from stage k-1's final weights (`init_from` is
set by `load_recipe`); a finished stage (its latest checkpoint at its max_steps) is not run
again under --resume, an unfinished one continues from its checkpoint, and a stage stopped by a
signal stops the recipe (the next `--resume` continues there). All ranks run this in step: the
checks read the same files.
"""

from __future__ import annotations

import gc
from pathlib import Path

from tfx.config.load import Stage
from tfx.errors import ConfigError
from tfx.log import get_logger
from tfx.train import checkpoint, runfolder

log = get_logger(__name__)


def finished(stage: Stage) -> bool:
    root = Path(stage.cfg.train.output_dir) / "checkpoints"
    tag = checkpoint.latest_tag(root) if root.is_dir() else None
    if tag is None:
        return False
    return checkpoint.read_complete(root / tag)["state"]["step"] >= stage.cfg.train.max_steps


def check_recipe(stages: list[Stage], *, resume: bool, overwrite: bool) -> None:
    """ConfigError when a stage folder holds a run and neither --resume nor --overwrite."""
    if len(stages) == 1 and not stages[0].name:
        runfolder.check_output_dir(stages[0].cfg.train.output_dir, resume=resume,
                                   overwrite=overwrite)
        return
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if resume or overwrite:
        return
    for s in stages:
        what = runfolder.describe_run(Path(s.cfg.train.output_dir))
        if what:
            root = Path(s.cfg.train.output_dir).parent
            raise ConfigError(f"train.output_dir: {root} already holds a run (stage {s.name}: "
                              f"{what}); pass --resume to continue it or --overwrite to start "
                              f"again (deletes every stage)")


def run_recipe(stages: list[Stage], *, resume: bool, overwrite: bool, stop) -> str:
    """"done" when every stage finished, else the status of the stage that stopped."""
    from tfx.train.loop import train

    check_recipe(stages, resume=resume, overwrite=overwrite)
    for i, stage in enumerate(stages):
        if stage.name and resume and finished(stage):
            log.info(f"stage {stage.name}: finished before, not run again")
            continue
        if stage.name:
            log.info(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.cfg.train.freeze}, "
                     f"{stage.cfg.train.max_steps} steps)"
                     + (f", from {stage.cfg.train.init_from}" if stage.cfg.train.init_from
                        else ""))
        recipe = {"stages": [s.name for s in stages], "index": i} if stage.name else None
        status = train(stage.cfg, resume=resume, overwrite=overwrite, stop=stop, recipe=recipe)
        gc.collect()  # the stage's engine and model go before the next one is built
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        if status != "done":
            return status
    return "done"


def current_output_dir(stages: list[Stage]) -> str:
    """The folder a stopped recipe continues in: the last stage that holds a checkpoint."""
    for s in reversed(stages):
        if (Path(s.cfg.train.output_dir) / "checkpoints").is_dir():
            return s.cfg.train.output_dir
    return stages[0].cfg.train.output_dir
