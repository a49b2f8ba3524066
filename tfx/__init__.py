"""tfx: a TokenFLEX vision-language trainer (flexible visual-token counts, DeepSpeed ZeRO-3).

Importing `tfx` is cheap and has no side effects: deepspeed, triton and transformers are imported
by the modules that need them, when they are used.
"""

__version__ = "0.1.0"
