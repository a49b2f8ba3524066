"""tfx: a TokenFLEX vision-language trainer (flexible visual-token counts, DeepSpeed ZeRO-3).

Importing `tfx` stays cheap: deepspeed, triton and transformers are imported by the modules
that need them. It also registers the exported TokenFLEX classes with transformers' Auto
classes, at once if transformers is loaded, else as soon as it is (`tfx._hf_hook`).
"""

from tfx import _hf_hook

__version__ = "0.1.0"

_hf_hook.install()
