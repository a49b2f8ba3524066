"""`python -m tfx.train CONFIG [key=value ...] [--resume]`: one rank of a training run.

This is what `deepspeed --num_gpus K --module tfx.train CONFIG ...` starts on every rank; run
without a launcher it trains as a single process.
"""

from tfx.cli import main_train_rank

if __name__ == "__main__":
    main_train_rank()
